"""A PyTorch reference of one MSF iteration, written for the parity tests.

It follows the official MSF code (MeanShift module, get_mlp, the training iteration) and
torchvision's ResNet layout and init, on one CPU device: DataParallel and ShuffleBN are left
out, which on one device changes nothing but the order of the batch inside BatchNorm.
`state_dict()` keys are those of the official checkpoints.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
  def __init__(self, block, layers, small_stem=False):
    super().__init__()
    self.inplanes = 64
    if small_stem:
      self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
      self.maxpool: nn.Module = nn.Identity()
    else:
      self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
      self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.bn1 = nn.BatchNorm2d(64)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Identity()
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth, small_stem=False):
  block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3])}[depth]
  return ResNet(block, layers, small_stem)


def get_mlp(inp_dim, hidden_dim, out_dim):
  return nn.Sequential(nn.Linear(inp_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                       nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class MeanShift(nn.Module):
  """The official MeanShift module (train_msf.py), one device."""
  queue: torch.Tensor  # buffers (register_buffer), declared for the type checker
  labels: torch.Tensor
  queue_ptr: torch.Tensor

  def __init__(self, depth, m=0.99, mem_bank_size=128000, topk=5, small_stem=False):
    super().__init__()
    self.m, self.mem_bank_size, self.topk = m, mem_bank_size, topk
    self.encoder_q = resnet(depth, small_stem)
    self.encoder_t = resnet(depth, small_stem)
    feat_dim = 2048 if depth == 50 else 512
    hidden_dim, proj_dim = feat_dim * 2, feat_dim // 4
    self.encoder_t.fc = get_mlp(feat_dim, hidden_dim, proj_dim)
    self.encoder_q.fc = get_mlp(feat_dim, hidden_dim, proj_dim)
    self.predict_q = get_mlp(proj_dim, hidden_dim, proj_dim)
    for param_q, param_t in zip(self.encoder_q.parameters(), self.encoder_t.parameters(),
                                strict=True):
      param_t.data.copy_(param_q.data)
      param_t.requires_grad = False
    self.register_buffer('queue', torch.randn(self.mem_bank_size, proj_dim))
    self.queue = F.normalize(self.queue, dim=1)
    self.register_buffer('labels', -1 * torch.ones(self.mem_bank_size).long())
    self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

  @torch.no_grad()
  def _momentum_update_target_encoder(self):
    for param_q, param_t in zip(self.encoder_q.parameters(), self.encoder_t.parameters(),
                                strict=True):
      param_t.data = param_t.data * self.m + param_q.data * (1. - self.m)

  @torch.no_grad()
  def _dequeue_and_enqueue(self, targets, labels):
    batch_size = targets.shape[0]
    ptr = int(self.queue_ptr)
    assert self.mem_bank_size % batch_size == 0
    self.queue[ptr:ptr + batch_size] = targets
    self.labels[ptr:ptr + batch_size] = labels
    self.queue_ptr[0] = (ptr + batch_size) % self.mem_bank_size

  def forward(self, im_q, im_t, labels):
    query = F.normalize(self.predict_q(self.encoder_q(im_q)), dim=1)
    with torch.no_grad():
      self._momentum_update_target_encoder()
      current_target = F.normalize(self.encoder_t(im_t), dim=1).detach()
      self._dequeue_and_enqueue(current_target, labels)
    targets = self.queue.clone().detach()
    dist_t = 2 - 2 * torch.einsum('bc,kc->bk', [current_target, targets])
    dist_q = 2 - 2 * torch.einsum('bc,kc->bk', [query, targets])
    _, nn_index = dist_t.topk(self.topk, dim=1, largest=False)
    nn_dist_q = torch.gather(dist_q, 1, nn_index)
    labels = labels.unsqueeze(1).expand(nn_dist_q.shape[0], nn_dist_q.shape[1])
    labels_queue = self.labels.clone().detach()
    labels_queue = labels_queue.unsqueeze(0).expand((nn_dist_q.shape[0], self.mem_bank_size))
    labels_queue = torch.gather(labels_queue, dim=1, index=nn_index)
    purity = ((labels_queue == labels).float().sum(dim=1) / self.topk).mean()
    loss = (nn_dist_q.sum(dim=1) / self.topk).mean()
    return loss, purity


def make_optimizer(model, lr, momentum=0.9, weight_decay=1e-4):
  """The official optimizer: SGD over the parameters that require gradients."""
  params = [p for p in model.parameters() if p.requires_grad]
  return torch.optim.SGD(params, lr, momentum=momentum, weight_decay=weight_decay)


def train_iteration(model, optimizer, im_q, im_t, labels):
  """One official training iteration (model.train(), forward, backward, step)."""
  model.train()
  loss, purity = model(im_q, im_t, labels)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return float(loss), float(purity)


def momentum_buffers(model, optimizer):
  """{parameter name: SGD momentum buffer} for the trainable parameters."""
  return {name: optimizer.state[p]['momentum_buffer'].detach().numpy()
          for name, p in model.named_parameters() if p in optimizer.state}
