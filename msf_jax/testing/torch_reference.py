"""A PyTorch reference of one MSF iteration, written for the parity tests.

It follows the official MSF code (MeanShift module, get_mlp, the training iteration) and
torchvision's ResNet layout and init, on one CPU device. The official run wraps each network
in `nn.DataParallel` over 4 GPUs and shuffles the target batch (ShuffleBN); with
`bn_group_size`, `data_parallel` computes what that does on one device (each chunk of the
batch through the network on its own, the first chunk's running statistics kept), and a
`shuffle` permutation of the target batch is taken as `get_shuffle_ids` draws one. Without,
it is one GPU's run. `state_dict()` keys are those of the official checkpoints.
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
  def __init__(self, block, layers, small_stem=False, width=64):
    super().__init__()
    self.inplanes = width
    if small_stem:
      self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
      self.maxpool: nn.Module = nn.Identity()
    else:
      self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
      self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.bn1 = nn.BatchNorm2d(width)
    self.layer1 = self._make_layer(block, width, layers[0])
    self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
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
        nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth, small_stem=False, width=64):
  block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3])}[depth]
  return ResNet(block, layers, small_stem, width)


def get_mlp(inp_dim, hidden_dim, out_dim):
  return nn.Sequential(
    nn.Linear(inp_dim, hidden_dim),
    nn.BatchNorm1d(hidden_dim),
    nn.ReLU(inplace=True),
    nn.Linear(hidden_dim, out_dim),
  )


def data_parallel(module, x, chunk_size):
  """module(x) as `nn.DataParallel` computes it over len(x) / chunk_size GPUs: each chunk
  through its own replica (BatchNorm over that chunk), the outputs concatenated, and the
  buffers (running statistics) those of the first replica, the only one DataParallel keeps.
  The gradients reach the shared parameters from every chunk, as DataParallel sums them."""
  if not chunk_size:
    return module(x)
  first, *others = x.split(chunk_size)
  outputs = [module(first)]
  # The other replicas update copies (swapped in, not written over: autograd holds these).
  kept = [
    (owner, name, buffer)
    for owner in module.modules()
    for name, buffer in owner.named_buffers(recurse=False)
  ]
  for owner, name, buffer in kept:
    setattr(owner, name, buffer.clone())
  outputs += [module(chunk) for chunk in others]
  for owner, name, buffer in kept:
    setattr(owner, name, buffer)
  return torch.cat(outputs)


class MeanShift(nn.Module):
  """The official MeanShift module (train_msf.py): one GPU, or with `bn_group_size` its
  DataParallel run on GPUs of that many images each."""

  queue: torch.Tensor  # buffers (register_buffer), declared for the type checker
  labels: torch.Tensor
  queue_ptr: torch.Tensor

  def __init__(
    self, depth, m=0.99, mem_bank_size=128000, topk=5, small_stem=False, width=64, bn_group_size=0
  ):
    super().__init__()
    self.m, self.mem_bank_size, self.topk = m, mem_bank_size, topk
    self.bn_group_size = bn_group_size
    self.encoder_q = resnet(depth, small_stem, width)
    self.encoder_t = resnet(depth, small_stem, width)
    feat_dim = width * (32 if depth == 50 else 8)
    hidden_dim, proj_dim = feat_dim * 2, feat_dim // 4
    self.encoder_t.fc = get_mlp(feat_dim, hidden_dim, proj_dim)
    self.encoder_q.fc = get_mlp(feat_dim, hidden_dim, proj_dim)
    self.predict_q = get_mlp(proj_dim, hidden_dim, proj_dim)
    for param_q, param_t in zip(
      self.encoder_q.parameters(), self.encoder_t.parameters(), strict=True
    ):
      param_t.data.copy_(param_q.data)
      param_t.requires_grad = False
    self.register_buffer('queue', torch.randn(self.mem_bank_size, proj_dim))
    self.queue = F.normalize(self.queue, dim=1)
    self.register_buffer('labels', -1 * torch.ones(self.mem_bank_size).long())
    self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

  @torch.no_grad()
  def _momentum_update_target_encoder(self):
    for param_q, param_t in zip(
      self.encoder_q.parameters(), self.encoder_t.parameters(), strict=True
    ):
      param_t.data = param_t.data * self.m + param_q.data * (1.0 - self.m)

  @torch.no_grad()
  def _dequeue_and_enqueue(self, targets, labels):
    batch_size = targets.shape[0]
    ptr = int(self.queue_ptr)
    assert self.mem_bank_size % batch_size == 0
    self.queue[ptr : ptr + batch_size] = targets
    self.labels[ptr : ptr + batch_size] = labels
    self.queue_ptr[0] = (ptr + batch_size) % self.mem_bank_size

  def forward(self, im_q, im_t, labels, shuffle=None):
    """`shuffle`: the permutation of the target batch (`get_shuffle_ids`'s forward ids)."""
    chunks = self.bn_group_size
    query = F.normalize(
      data_parallel(self.predict_q, data_parallel(self.encoder_q, im_q, chunks), chunks), dim=1
    )
    with torch.no_grad():
      self._momentum_update_target_encoder()
      order = torch.arange(len(im_t)) if shuffle is None else shuffle
      current_target = F.normalize(data_parallel(self.encoder_t, im_t[order], chunks), dim=1)
      current_target = current_target[torch.argsort(order)].detach()
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


def train_iteration(model, optimizer, im_q, im_t, labels, shuffle=None):
  """One official training iteration (model.train(), forward, backward, step)."""
  model.train()
  loss, purity = model(im_q, im_t, labels, shuffle)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return float(loss), float(purity)


def momentum_buffers(model, optimizer):
  """{parameter name: SGD momentum buffer} for the trainable parameters."""
  return {
    name: optimizer.state[p]['momentum_buffer'].detach().numpy()
    for name, p in model.named_parameters()
    if p in optimizer.state
  }
