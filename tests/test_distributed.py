"""Multi-process training: start-up rules of msf_jax.distributed, and a real two-process job
(jax.distributed on 127.0.0.1, gloo collectives, 2 CPU devices per process) that must take
the same step as one process with 4 devices, write one orbax checkpoint together, read each
epoch's examples at most once between them, and evaluate as one process does (the second time
from the features the first cached); the training program as two processes."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from msf_jax import (
  create_state,
  distributed,
  make_mesh,
  make_train_step,
  put_batch,
  put_state,
)
from msf_jax.checkpoint import Checkpointer, checkpoint_directory
from msf_jax.evaluate import run
from msf_jax.sharding import replicated
from msf_jax.train_state import abstract_state

from distributed_worker import EPOCHS_READ, EVALUATION, global_batch, step_config
from helpers import (
  DEVICES_PER_PROCESS,
  PROCESSES,
  REPO,
  TRAIN_CONFIG,
  assert_trees_close,
  eval_config,
  free_port,
  overrides as main_overrides,
  run_in_process,
  run_processes,
  skip_without_cpu_collectives,
  small_run_config,
  write_folder,
)

WORKER = os.path.join(REPO, 'tests', 'distributed_worker.py')
FOLDER_IMAGES = 27  # one image per class, so a label names its image; 27 = 3 x 8 + 3
SLURM = {
  'SLURM_JOB_ID': '77',
  'SLURM_STEP_NODELIST': 'node[003-004]',
  'SLURM_NTASKS': '2',
  'SLURM_PROCID': '1',
  'SLURM_LOCALID': '0',
}
OMPI = {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1:34911'}
GKE_HOSTS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')
CLUSTER_ENV = (
  *SLURM,
  *OMPI,
  *GKE_HOSTS,
  'TPU_SKIP_MDS_QUERY',
  'JAX_FORCE_TPU_INIT',
  'TPU_LIBRARY_PATH',
  'KUBERNETES_SERVICE_HOST',
)


# --- Start-up rules (no second process) -----------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
  """No cluster variables, whatever the machine running the tests has set."""
  for name in CLUSTER_ENV:
    monkeypatch.delenv(name, raising=False)


@pytest.fixture
def joins(monkeypatch, clean_env):
  """Records the calls to jax.distributed.initialize instead of joining a job, on a machine
  that is no Cloud TPU VM until a test says otherwise."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args: calls.append(args))
  monkeypatch.setattr(distributed, '_running_in_cloud_tpu_vm', lambda: False)
  return calls


@pytest.mark.parametrize(
  'tpu_vm, env, cluster',
  [
    (False, OMPI, 'ompi'),
    (False, SLURM, 'slurm'),
    (False, {**SLURM, **OMPI}, 'ompi'),  # jax's order
    (True, SLURM, 'slurm'),
    (True, {'TPU_WORKER_HOSTNAMES': 't1v-n-0,t1v-n-1'}, 'gketpu'),
    (True, {'TPU_PROCESS_ADDRESSES': '10.0.0.2:8476,10.0.0.3:8476'}, 'gketpu'),
    (True, {'TPU_WORKER_HOSTNAMES': 't1v-n-0', 'TPU_SKIP_MDS_QUERY': '1'}, 'gketpu'),
    (True, {}, 'gcetpu'),
  ],
  ids=[
    'ompi',
    'slurm',
    'ompi-before-slurm',
    'slurm-on-tpu-vm',
    'gke-hostnames',
    'gke-addresses',
    'gke-without-metadata',
    'gce',
  ],
)
def test_cluster_is_detected_and_configures_itself(joins, monkeypatch, tpu_vm, env, cluster):
  monkeypatch.setattr(distributed, '_running_in_cloud_tpu_vm', lambda: tpu_vm)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.detected_cluster() == cluster
  distributed.initialize()
  assert joins == [()]  # jax reads the coordinator, count and index from the cluster itself


@pytest.mark.parametrize(
  'tpu_vm, env',
  [
    (False, {}),
    *((False, {n: v for n, v in SLURM.items() if n != missing}) for missing in SLURM),
    (False, {'TPU_WORKER_HOSTNAMES': 't1v-n-0,t1v-n-1'}),  # no TPU VM: no TPU cluster
    (True, {'TPU_SKIP_MDS_QUERY': '1'}),  # a TPU VM outside GCE's metadata
    (True, {'TPU_SKIP_MDS_QUERY': ''}),  # set counts, as for jax
    (False, {'KUBERNETES_SERVICE_HOST': '10.0.0.1'}),  # needs the kubernetes package in jax
  ],
  ids=[
    'plain',
    *(f'slurm-without-{missing}' for missing in SLURM),
    'hostnames-off-tpu-vm',
    'tpu-vm-skip-mds',
    'tpu-vm-skip-mds-empty',
    'kubernetes',
  ],
)
def test_plain_machine_stays_a_single_process(joins, monkeypatch, tpu_vm, env):
  monkeypatch.setattr(distributed, '_running_in_cloud_tpu_vm', lambda: tpu_vm)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.detected_cluster() is None
  distributed.initialize()
  assert joins == []


V5E, GVNIC, H100 = ('0x1ae0', '0x0063'), ('0x1ae0', '0x0042'), ('0x10de', '0x2330')


@pytest.mark.parametrize(
  'libtpu, pci_devices, tpu_vm',
  [
    ('package', [GVNIC, V5E, V5E], True),
    ('library path', [V5E], True),
    ('package', [GVNIC, H100], False),  # Google's vendor id, but a network card
    ('package', [], False),
    (None, [V5E], False),
    ('missing library path', [V5E], False),
  ],
)
def test_cloud_tpu_vm_has_libtpu_and_tpu_chips(
  clean_env, tmp_path, monkeypatch, libtpu, pci_devices, tpu_vm
):
  for i, (vendor, device) in enumerate(pci_devices):
    folder = tmp_path / 'pci' / f'0000:00:{i + 4:02x}.0'
    folder.mkdir(parents=True)
    (folder / 'vendor').write_text(vendor + '\n')
    (folder / 'device').write_text(device + '\n')
  monkeypatch.setattr(distributed, '_PCI_DEVICES', str(tmp_path / 'pci'))
  monkeypatch.setattr(
    distributed,
    'find_spec',
    lambda name: object() if libtpu == 'package' and name == 'libtpu' else None,
  )
  if libtpu == 'library path':
    (tmp_path / 'libtpu.so').write_bytes(b'')
  if libtpu in ('library path', 'missing library path'):
    monkeypatch.setenv('TPU_LIBRARY_PATH', str(tmp_path / 'libtpu.so'))
  assert distributed._running_in_cloud_tpu_vm() is tpu_vm


def test_forced_tpu_init_makes_a_cloud_tpu_vm(clean_env, tmp_path, monkeypatch):
  monkeypatch.setattr(distributed, '_PCI_DEVICES', str(tmp_path))
  monkeypatch.setattr(distributed, 'find_spec', lambda name: None)
  assert not distributed._running_in_cloud_tpu_vm()
  monkeypatch.setenv('JAX_FORCE_TPU_INIT', '1')
  assert distributed._running_in_cloud_tpu_vm()


@pytest.fixture
def platforms_chosen(monkeypatch, clean_env, tmp_path):
  """The jax_platforms `cpu_alone_without_accelerators` sets, on a machine of no TPU chip and
  no GPU until a test adds them (under tmp_path) or sets JAX_PLATFORMS."""
  chosen = []
  monkeypatch.setattr(jax.config, 'update', lambda name, value: chosen.append((name, value)))
  monkeypatch.delenv('JAX_PLATFORMS')  # conftest sets it
  monkeypatch.setattr(distributed, '_PCI_DEVICES', str(tmp_path / 'pci'))
  monkeypatch.setattr(distributed, '_GPU_DEVICE_FILES', (str(tmp_path / 'nvidia0'),))
  return chosen


def add_pci_device(root, vendor: str, device: str) -> None:
  folder = root / 'pci' / f'0000:00:{len(list(root.glob("pci/*"))) + 4:02x}.0'
  folder.mkdir(parents=True)
  (folder / 'vendor').write_text(vendor + '\n')
  (folder / 'device').write_text(device + '\n')


def test_a_machine_without_accelerators_runs_jax_on_the_cpu_alone(platforms_chosen, tmp_path):
  add_pci_device(tmp_path, *GVNIC)
  assert distributed.cpu_alone_without_accelerators()
  assert platforms_chosen == [('jax_platforms', 'cpu')]


@pytest.mark.parametrize('machine', ['tpu chip', 'gpu', 'forced tpu', 'platforms given'])
def test_an_accelerator_or_the_users_choice_keeps_jaxs_platforms(
  platforms_chosen, tmp_path, monkeypatch, machine
):
  if machine == 'tpu chip':
    add_pci_device(tmp_path, *V5E)
  elif machine == 'gpu':
    (tmp_path / 'nvidia0').write_text('')
  elif machine == 'forced tpu':
    monkeypatch.setenv('JAX_FORCE_TPU_INIT', '1')
  else:
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu,tpu')
  assert not distributed.cpu_alone_without_accelerators()
  assert platforms_chosen == []


def test_a_cpu_run_does_not_load_libtpu():
  """What the function is for, in a process of its own without JAX_PLATFORMS: jax would load
  libtpu (installed with the test requirements) and libtpu print its errors."""
  if distributed._tpu_chips_attached() or any(map(os.path.exists, distributed._GPU_DEVICE_FILES)):
    pytest.skip('This machine has an accelerator.')
  if not os.path.exists('/proc/self/maps'):
    pytest.skip("The loaded libraries are read from Linux's /proc/self/maps.")
  code = (
    'from msf_jax import distributed; import jax; '
    'assert distributed.cpu_alone_without_accelerators(); jax.devices(); '
    "print('libtpu loaded:', 'libtpu' in open('/proc/self/maps').read())"
  )
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.stdout.strip() == 'libtpu loaded: False', result.stdout + result.stderr
  assert 'TPU' not in result.stderr, result.stderr


def test_explicit_values_are_passed_on(joins):
  distributed.initialize('10.0.0.1:1234', 4, 3)
  assert joins == [('10.0.0.1:1234', 4, 3)]


@pytest.mark.parametrize(
  'args, message',
  [
    (('10.0.0.1:1234', None, 0), 'missing: --num_processes'),
    ((None, 2, None), 'missing: --coordinator_address, --process_id'),
    (('10.0.0.1:1234', 2, 2), r'process id must be in \[0, num_processes\)'),
    (('10.0.0.1', 2, 0), 'host:port'),
  ],
)
def test_bad_or_half_given_values_are_clear_errors(joins, args, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(*args)
  assert joins == []


def test_main_rejects_half_given_flags_before_training(tmp_path, capfd):
  code, console = run_in_process(
    [
      f'--config={TRAIN_CONFIG}',
      f'--workdir={tmp_path}',
      '--coordinator_address=127.0.0.1:1234',
    ],
    capfd,
  )
  assert code == 1 and 'missing: --num_processes, --process_id' in console, console
  assert not os.listdir(tmp_path)  # nothing trained, nothing written


# --- A real two-process job -----------------------------------------------------------------


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return write_folder(
    tmp_path_factory.mktemp('images'), 'train', classes=FOLDER_IMAGES, per_class=1, size=(20, 20)
  )


def one_process_reference():
  """The same step on one process with 4 of conftest's 8 CPU devices."""
  with jax.enable_x64(True):
    config = step_config()
    mesh = make_mesh(jax.devices()[: PROCESSES * DEVICES_PER_PROCESS])
    state = put_state(create_state(config, jax.random.key(0)), config, mesh)
    train_step = make_train_step(config, mesh, steps_per_epoch=1, finish_views=False)
    batch = global_batch(config)
    # One process holds the whole batch: the target order counts in all of it.
    half = config.batch_size // PROCESSES
    batch['target_order'] += np.arange(config.batch_size, dtype=np.int32) // half * half
    state, metrics = train_step(state, put_batch(batch, mesh))
    return jax.device_get(state), float(metrics['loss'])


def worker_state(results, like):
  """A worker's saved leaves in the structure of the state `like`."""
  leaves = jax.tree.leaves(like)
  return jax.tree.unflatten(
    jax.tree.structure(like), [results[f'state_{i}'] for i in range(len(leaves))]
  )


@pytest.fixture(scope='module')
def job(tmp_path_factory, folder):
  """Runs the two workers (and the reference meanwhile); their results and the reference."""
  skip_without_cpu_collectives()
  out_dir = tmp_path_factory.mktemp('job')
  port = free_port()
  reference, _ = run_processes(
    [
      [sys.executable, WORKER, str(port), str(p), str(PROCESSES), folder, str(out_dir)]
      for p in range(PROCESSES)
    ],
    before_waiting=one_process_reference,
  )
  results = [dict(np.load(out_dir / f'process_{p}.npz')) for p in range(PROCESSES)]
  return results, reference, out_dir


@pytest.mark.slow
def test_processes_see_the_whole_job(job):
  results, _, _ = job
  for p, r in enumerate(results):
    assert int(r['process_index']) == p and int(r['process_count']) == PROCESSES
    assert int(r['local_device_count']) == DEVICES_PER_PROCESS
    assert int(r['device_count']) == PROCESSES * DEVICES_PER_PROCESS


@pytest.mark.slow
def test_two_processes_take_the_step_of_one_process_with_four_devices(job):
  results, (reference, reference_loss), _ = job
  for r in results:  # float64: tensor by tensor, as the 8- against 1-device test in float64
    assert_trees_close(worker_state(r, reference), reference, rtol=1e-9)
    assert float(r['loss']) == pytest.approx(reference_loss, rel=1e-9)


@pytest.mark.slow
def test_checkpoint_written_by_two_processes_restores_on_one(job):
  results, (reference, _), out_dir = job
  with jax.enable_x64(True):
    restored = Checkpointer(checkpoint_directory(out_dir)).restore(
      abstract_state(step_config(), replicated(make_mesh(jax.devices()[:1])))
    )
  assert int(restored.step) == 1
  assert_trees_close(restored, worker_state(results[0], reference), rtol=0)


@pytest.mark.slow
def test_each_epoch_reads_every_example_at_most_once_across_processes(job):
  results, _, _ = job
  steps = int(results[0]['steps_per_epoch'])
  batch = step_config().batch_size
  assert steps == FOLDER_IMAGES // batch == 3
  for epoch in range(EPOCHS_READ):
    shares = [r['epoch_labels'][epoch] for r in results]
    # Each process reads steps x (batch / processes) images of its own share ...
    assert all(len(share) == steps * batch // PROCESSES for share in shares)
    union = np.concatenate(shares)
    # ... and together they read steps x batch distinct images: the remainder of
    # 27 - 3 x 8 = 3 images (different ones each epoch) is dropped, nothing is read twice.
    assert len(np.unique(union)) == len(union) == steps * batch
    assert set(union) <= set(range(FOLDER_IMAGES))
  orders = [np.concatenate([r['epoch_labels'][e] for r in results]) for e in range(EPOCHS_READ)]
  assert not np.array_equal(orders[0], orders[1])  # each epoch is shuffled afresh


@pytest.mark.slow
def test_two_processes_evaluate_as_one_and_reuse_the_cache(job, tmp_path):
  _, _, out_dir = job
  workdir = out_dir / 'evaluation'
  records = [json.loads((out_dir / f'evaluation_{p}.json').read_text()) for p in range(PROCESSES)]
  results = json.loads((workdir / run.RESULTS_FILE).read_text())['results']
  written = records[0]['cache_after_first']
  for record in records:
    assert record['first_results'] == record['second_results'] == results
    # The second time every process found both splits cached: no extraction, no rewrite.
    assert record['cache_after_first'] == record['cache_after_second'] == written
    assert record['event_files_after_first'] == 1  # process 0 writes, once an evaluation
    assert record['event_files_after_second'] == 2

  single = tmp_path / 'single'
  one_process = run.evaluate(eval_config(**EVALUATION), str(single))
  # Features agree to float rounding, which may move a neighbour at the edge of k = 20 and
  # so flip at most one of the 45 queries.
  assert one_process.keys() == results.keys()
  assert all(abs(one_process[key] - results[key]) <= 1 / 45 + 1e-9 for key in results)
  by_split = lambda names: {name.rsplit('_', 1)[0]: name for name in names}
  two_caches = by_split(written)
  one_caches = by_split(path.name for path in (single / run.CACHE_DIR).iterdir())
  assert two_caches.keys() == one_caches.keys()
  # The key counts the processes (a TFDS subset depends on them), so each run has its own file.
  assert not set(two_caches.values()) & set(one_caches.values())
  for split_name, name in two_caches.items():
    with (
      np.load(workdir / run.CACHE_DIR / name) as two,
      np.load(single / run.CACHE_DIR / one_caches[split_name]) as one,
    ):
      # The same rows, in another order: the gather puts each host's share after the other.
      distance = np.linalg.norm(two['features'][:, None] - one['features'][None], axis=-1)
      match = distance.argmin(axis=1)
      assert sorted(match) == list(range(45))
      np.testing.assert_array_equal(two['labels'], one['labels'][match])
      np.testing.assert_allclose(two['features'], one['features'][match], rtol=1e-5, atol=1e-6)


def two_process_flags(workdir, folder, num_epochs: int, **settings) -> list[str]:
  """msf_jax.main's flags for both processes of a job on `folder` (all but --process_id),
  checkpointing every 2 steps of 3 an epoch, with more config `settings`."""
  return [
    f'--config={TRAIN_CONFIG}',
    f'--workdir={workdir}',
    *main_overrides(
      folder, num_epochs=num_epochs, **{'checkpoint.every_epochs': 2 / 3, **settings}
    ),
    f'--coordinator_address=127.0.0.1:{free_port()}',
    f'--num_processes={PROCESSES}',
  ]


@pytest.mark.slow
def test_training_program_runs_as_two_processes_and_stops_together_on_ctrl_c(tmp_path, folder):
  # 27 images, batch 8: 3 steps an epoch, a checkpoint every 2 steps written by both
  # processes. As the official run: BatchNorm over each device's 2 images, each host shuffling
  # its targets. Process 1 gets Ctrl-C after its save of step 2; process 0 gets none. Both
  # must save the same step together and exit 130, and only process 0 prints where and how to
  # resume. (A run's normal end differs from this stop only in its exit status and last lines,
  # which test_main.py checks in one process.)
  skip_without_cpu_collectives()
  flags = two_process_flags(
    tmp_path, folder, num_epochs=100, **{'model.bn_group_size': 2, 'msf.shuffle_target': True}
  )
  programs = [['-m', 'msf_jax.main'], [os.path.join(REPO, 'tests', 'interrupt_worker.py')]]
  _, outputs = run_processes(
    [[sys.executable, *program, *flags, f'--process_id={p}'] for p, program in enumerate(programs)],
    extra_env={'SIGNAL_AFTER_STEP': '2'},
    expected_status=130,
  )
  for p, output in enumerate(outputs):
    assert f'Process {p} of {PROCESSES}: {DEVICES_PER_PROCESS} local devices of 4' in output
  stopped = [int(output.split('Stopping at step ')[1].split(';')[0]) for output in outputs]
  assert stopped[0] == stopped[1] > 2 and stopped[0] < 300, outputs
  assert 'Resume with: python -m msf_jax.main' in outputs[0]
  assert 'Resume with' not in outputs[1]
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 1  # process 0's only
  checkpointer = Checkpointer(checkpoint_directory(str(tmp_path)))
  assert checkpointer.latest_step() == stopped[0]
  state = checkpointer.restore(
    abstract_state(small_run_config(), replicated(make_mesh(jax.devices()[:1])))
  )
  assert int(state.step) == stopped[0] and int(state.bank.ptr) == stopped[0] * 8 % 32
