"""The launchers: --dry_run prints the expected commands, and real runs (with stand-ins for
ssh, gcloud and Python on PATH) run them with every argument intact.

Expected commands are written out here word by word; printed lines are split with
`shlex` (POSIX shell rules) before comparing, so quoting mistakes show up as wrong words.
The commands that reach colt5_flax's entry points are also parsed with gin, the way the
entry points parse them, so a launcher cannot print a configuration that does not parse.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import gin
import pytest

from colt5_flax import gin_utils
from colt5_flax.data import scrolls_table

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
CONFIGS = REPO / "configs"
TASKS = list(scrolls_table.NAMES)


def run_script(name, *args, env=None, check=True):
  result = subprocess.run(
      [str(SCRIPTS / name), *args],
      capture_output=True,
      text=True,
      env={**os.environ, **(env or {})},
      timeout=120,
      check=False,
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


def printed_commands(stdout):
  """Non-comment lines of a dry run, split into words."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def write_executable(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


def gin_args(words):
  """(gin files, gin bindings) of an entry point's command-line words."""
  files = [w.split("=", 1)[1] for w in words if w.startswith("--gin_file=")]
  bindings = gin_utils.rewrite_gin_args([w for w in words if w.startswith("--gin.")])
  return files, [b.split("=", 1)[1] for b in bindings]


def assert_parses(words):
  files, bindings = gin_args(words)
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags([str(CONFIGS)], files, bindings)
  finally:
    gin.clear_config()


# -- GPU ---------------------------------------------------------------------------------------


GPU_ARGS = [
    "--hosts=gpu-a,gpu-b,gpu-c",
    "--gin_file=models/colt5_base.gin",
    "--gin_file=runs/pretrain_ul2.gin",
    "--model_dir=gs://bucket/colt5 run",
    "--gin.NUM_PARTITIONS=2",
    "--port=9999",
    "--workdir=/srv/colt5 flax",
]


def expected_gpu_words(index, python="python3"):
  return [
      "cd", "/srv/colt5 flax", "&&", python, "-m", "colt5_flax.train", "--multiprocess",
      "--coordinator_address=gpu-a:9999", "--process_count=3", f"--process_index={index}",
      "--gin_file=models/colt5_base.gin", "--gin_file=runs/pretrain_ul2.gin",
      "--gin.MODEL_DIR='gs://bucket/colt5 run'", "--gin.NUM_PARTITIONS=2",
  ]


def test_gpu_dry_run_prints_one_ssh_per_host():
  result = run_script("launch_gpu_multinode.sh", *GPU_ARGS, "--dry_run")
  commands = printed_commands(result.stdout)
  assert len(commands) == 3
  for index, (command, host) in enumerate(zip(commands, ["gpu-a", "gpu-b", "gpu-c"],
                                              strict=True)):
    assert command[:2] == ["ssh", host] and len(command) == 3
    assert shlex.split(command[2]) == expected_gpu_words(index)
  # The entry point's own flags are the ones the launcher sets.
  for flag in ("multiprocess", "coordinator_address", "process_count", "process_index"):
    assert flag in gin_utils.FLAGS
  assert_parses(expected_gpu_words(0))


def test_gpu_launch_runs_every_process_and_waits(tmp_path):
  """A stand-in ssh runs the remote command locally; a stand-in python records its argv."""
  record = tmp_path / "argv"
  record.mkdir()
  fake_ssh = write_executable(
      tmp_path / "fake_ssh",
      '#!/usr/bin/env bash\n# fake_ssh HOST COMMAND: run COMMAND here, in a shell.\n'
      'host="$1"; shift; exec bash -c "$1"\n',
  )
  fake_python = write_executable(
      tmp_path / "fake_python",
      '#!/usr/bin/env python3\nimport json, os, sys\n'
      'index = [a for a in sys.argv if a.startswith("--process_index=")][0].split("=")[1]\n'
      f'json.dump([os.getcwd()] + sys.argv[1:], open("{record}/" + index, "w"))\n',
  )
  workdir = tmp_path / "colt5 flax"
  workdir.mkdir()
  args = [a for a in GPU_ARGS if not a.startswith("--workdir=")]
  run_script(
      "launch_gpu_multinode.sh", *args, f"--workdir={workdir}", f"--ssh={fake_ssh}",
      f"--python={fake_python}", f"--log_dir={tmp_path / 'logs'}",
  )
  for index in range(3):
    cwd, *argv = json.loads((record / str(index)).read_text())
    assert cwd == str(workdir)
    assert argv == expected_gpu_words(index)[4:]
  assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
      "0-gpu-a.log", "1-gpu-b.log", "2-gpu-c.log",
  ]


def test_gpu_launch_fails_when_a_process_fails(tmp_path):
  fake_ssh = write_executable(
      tmp_path / "fake_ssh", '#!/usr/bin/env bash\n[[ "$1" != gpu-b ]]\n'
  )
  result = run_script(
      "launch_gpu_multinode.sh", *GPU_ARGS, f"--ssh={fake_ssh}",
      f"--log_dir={tmp_path / 'logs'}", check=False,
  )
  assert result.returncode == 1
  assert "process 1 on gpu-b failed" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gin_file=models/colt5_base.gin"], "--hosts"),
        (["--hosts=a"], "--gin_file"),
        (["--hosts=a", "--gin_file=x.gin", "--entry=export"], "--entry"),
        (["--hosts=a", "--gin_file=x.gin", "--bogus"], "--bogus"),
    ],
)
def test_gpu_bad_arguments_are_named(args, message):
  result = run_script("launch_gpu_multinode.sh", *args, "--dry_run", check=False)
  assert result.returncode == 2 and message in result.stderr


# -- TPU ---------------------------------------------------------------------------------------


TPU_ARGS = [
    "--tpu=colt5-pod",
    "--zone=us-central2-b",
    "--project=my-project",
    "--accelerator_type=v4-128",
    "--model_dir=gs://bucket/colt5_base_ul2",
    "--gin_file=models/colt5_base.gin",
    "--gin_file=runs/pretrain_ul2.gin",
    "--gin.NUM_PARTITIONS=4",
]
WHERE = ["--zone=us-central2-b", "--project=my-project"]
START_WORDS = [
    "cd", "~/colt5-flax", "&&", "python3", "-m", "colt5_flax.train", "--multiprocess",
    "--gin.MODEL_DIR='gs://bucket/colt5_base_ul2'", "--gin_file=models/colt5_base.gin",
    "--gin_file=runs/pretrain_ul2.gin", "--gin.NUM_PARTITIONS=4",
]


def _split_command_flag(words):
  """The gcloud ssh words with the --command value split into its own words."""
  (command,) = [w for w in words if w.startswith("--command=")]
  return [w for w in words if w != command], command[len("--command="):]


def test_tpu_dry_run_prints_create_install_and_start():
  result = run_script("launch_tpu_pod.sh", *TPU_ARGS, "--spot", "--dry_run")
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  describe, create, archive, scp, install, start = printed_commands(result.stdout)
  assert describe == gcloud + ["describe", "colt5-pod"] + WHERE
  assert create == gcloud + [
      "create", "colt5-pod", *WHERE, "--accelerator-type=v4-128",
      "--version=tpu-ubuntu2204-base", "--spot",
  ]
  assert archive[:5] == ["git", "-C", str(REPO), "archive", "--format=tar.gz"]
  tarball = archive[5][len("--output="):]
  assert archive[6:] == ["HEAD"] and tarball.endswith(".tar.gz")
  assert scp == gcloud + ["scp", tarball, "colt5-pod:colt5-flax.tar.gz", *WHERE, "--worker=all"]
  install_words, install_command = _split_command_flag(install)
  assert install_words == gcloud + ["ssh", "colt5-pod", *WHERE, "--worker=all"]
  assert "tar -xzf ~/colt5-flax.tar.gz -C ~/colt5-flax" in install_command
  assert "pip install" in install_command and "[tpu]" in install_command
  start_words, start_command = _split_command_flag(start)
  assert start_words == gcloud + ["ssh", "colt5-pod", *WHERE, "--worker=all"]
  assert shlex.split(start_command) == START_WORDS
  assert_parses(START_WORDS)


def test_tpu_no_install_skips_shipping():
  result = run_script("launch_tpu_pod.sh", *TPU_ARGS, "--no_install", "--dry_run")
  commands = printed_commands(result.stdout)
  assert [c[4] for c in commands] == ["describe", "create", "ssh"]


def _fake_gcloud(tmp_path, exists: bool) -> dict[str, str]:
  log = tmp_path / "gcloud.log"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_executable(
      bin_dir / "gcloud",
      "#!/usr/bin/env python3\nimport json, sys\n"
      f"open('{log}', 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
      f"sys.exit(0 if sys.argv[4] != 'describe' or {exists} else 1)\n",
  )
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}


def _gcloud_calls(tmp_path):
  return [json.loads(line) for line in (tmp_path / "gcloud.log").read_text().splitlines()]


@pytest.mark.parametrize("exists", [False, True])
def test_tpu_launch_creates_or_reuses_the_slice(tmp_path, exists):
  env = _fake_gcloud(tmp_path, exists)
  run_script("launch_tpu_pod.sh", *TPU_ARGS, env=env)
  verbs = [call[3] for call in _gcloud_calls(tmp_path)]
  if exists:
    assert verbs == ["describe", "scp", "ssh", "ssh"]
  else:
    assert verbs == ["describe", "create", "scp", "ssh", "ssh"]
  scp = _gcloud_calls(tmp_path)[-3]
  # The archive was built from HEAD and removed after the copy.
  assert scp[4].startswith(str(tmp_path)) and not Path(scp[4]).exists()
  _, start_command = _split_command_flag(_gcloud_calls(tmp_path)[-1])
  assert shlex.split(start_command) == START_WORDS


def test_tpu_launch_needs_the_accelerator_type_to_create(tmp_path):
  env = _fake_gcloud(tmp_path, exists=False)
  args = [a for a in TPU_ARGS if not a.startswith("--accelerator_type")]
  result = run_script("launch_tpu_pod.sh", *args, env=env, check=False)
  assert result.returncode == 2 and "--accelerator_type" in result.stderr


@pytest.mark.parametrize(
    "replace, message",
    [
        ("--model_dir=/tmp/local_run", "GCS"),
        ("--model_dir=", "--model_dir"),
        ("--tpu=", "--tpu"),
        ("--zone=", "--zone"),
    ],
)
def test_tpu_bad_arguments_are_named(replace, message):
  key = replace.split("=")[0]
  args = [a for a in TPU_ARGS if not a.startswith(key + "=")]
  if not replace.endswith("="):
    args.append(replace)
  result = run_script("launch_tpu_pod.sh", *args, "--dry_run", check=False)
  assert result.returncode == 2 and message in result.stderr


# -- SCROLLS fine-tuning -----------------------------------------------------------------------


FINETUNE_ARGS = [
    "--model=models/colt5_base.gin",
    "--pretrained=gs://bucket/ul2/checkpoint_1000000",
    "--output_dir=gs://bucket/scrolls",
    "--scrolls_data_dir=/data/scrolls",
    "--gin_file=ablations/static_routing.gin",
    "--gin.NUM_PARTITIONS=2",
]


def expected_finetune_commands(task, best, *, python="python3", output="gs://bucket/scrolls",
                               extra=("--gin_file=ablations/static_routing.gin",
                                      "--gin.NUM_PARTITIONS=2"),
                               initial="'gs://bucket/ul2/checkpoint_1000000'"):
  files = lambda run: [  # noqa: E731
      "--gin_file=models/colt5_base.gin", f"--gin_file=runs/{run}.gin",
      f"--gin_file=tasks/scrolls_{task}.gin", *extra,
  ]
  checkpoint = f"{output}/{task}/checkpoint_{best}"
  return [
      [python, "-m", "colt5_flax.train", *files("finetune_scrolls"),
       f"--gin.MODEL_DIR='{output}/{task}'", f"--gin.INITIAL_CHECKPOINT_PATH={initial}"],
      [python, "-m", "colt5_flax.evaluate", *files("eval"),
       f"--gin.CHECKPOINT_PATH='{checkpoint}'",
       f"--gin.EVAL_OUTPUT_DIR='{output}/{task}/eval_best'"],
      [python, "-m", "colt5_flax.infer", *files("infer"),
       f"--gin.CHECKPOINT_PATH='{checkpoint}'",
       f"--gin.INFER_OUTPUT_DIR='{output}/predictions'"],
  ]


def test_finetune_all_dry_run_prints_every_step():
  result = run_script("finetune_all_scrolls.sh", *FINETUNE_ARGS, "--dry_run")
  commands = printed_commands(result.stdout)
  expected = []
  for task in TASKS:
    expected += expected_finetune_commands(task, "<BEST_STEP>")
  expected.append(
      ["python3", "scripts/make_scrolls_submission.py"]
      + [f"--{t}=gs://bucket/scrolls/predictions/scrolls_{t}-test-<BEST_STEP>.jsonl"
         for t in TASKS]
      + ["--scrolls_data_dir=/data/scrolls",
         "--output_csv=gs://bucket/scrolls/scrolls_submission.csv"]
  )
  assert commands == expected
  # Every entry-point command is a configuration that parses.
  for command in commands[:-1]:
    assert_parses(command)


def test_finetune_all_local_files_and_subset():
  result = run_script(
      "finetune_all_scrolls.sh", "--model=models/colt5_base.gin", "--pretrained=none",
      "--output_dir=/out/", "--tasks=qasper,contract_nli", "--local", "--dry_run",
      env={"SCROLLS_DATA_DIR": "/data/scrolls"},
  )
  commands = printed_commands(result.stdout)
  assert len(commands) == 6  # no CSV for a subset
  assert "subset" in result.stderr
  train = commands[3]
  assert train[2:6] == [
      "colt5_flax.train", "--gin_file=models/colt5_base.gin",
      "--gin_file=runs/finetune_scrolls.gin", "--gin_file=tasks/scrolls_contract_nli.gin",
  ]
  assert train[6:] == [
      "--gin.MIXTURE_OR_TASK_NAME='scrolls_contract_nli_local'",
      "--gin.BEST_METRIC='eval/scrolls_contract_nli_local/scrolls_score'",
      "--gin.MODEL_DIR='/out/contract_nli'", "--gin.INITIAL_CHECKPOINT_PATH=None",
  ]
  assert_parses(train)


def test_finetune_all_through_a_launcher():
  result = run_script(
      "finetune_all_scrolls.sh", *FINETUNE_ARGS, "--tasks=qasper", "--dry_run",
      "--launcher=scripts/launch_tpu_pod.sh --tpu=pod --zone=z --no_install",
  )
  train, evaluate, infer = printed_commands(result.stdout)
  expected = expected_finetune_commands("qasper", "<BEST_STEP>")
  launcher = ["scripts/launch_tpu_pod.sh", "--tpu=pod", "--zone=z", "--no_install"]
  for command, entry, want in zip((train, evaluate, infer), ("train", "evaluate", "infer"),
                                  expected, strict=True):
    assert command == launcher + [f"--entry={entry}"] + want[3:]


def test_finetune_all_runs_the_best_checkpoint_and_builds_the_csv(tmp_path):
  """A stand-in Python: training writes known dev scores, so the best step is known."""
  record = tmp_path / "calls.jsonl"
  fake_python = write_executable(
      tmp_path / "fake_python",
      f"#!{sys.executable}\n"
      "import json, os, re, sys\n"
      f"open('{record}', 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
      "args = sys.argv[1:]\n"
      "if args[:2] == ['-m', 'colt5_flax.train']:\n"
      "  model_dir = [a for a in args if a.startswith('--gin.MODEL_DIR=')][0]\n"
      "  model_dir = model_dir.split('=', 1)[1].strip(\"'\")\n"
      "  task = os.path.basename(model_dir)\n"
      "  os.makedirs(model_dir)\n"
      "  scores = {1000: 10.0, 2000: 30.0 + len(task), 3000: 20.0}\n"
      "  with open(os.path.join(model_dir, 'eval_metrics.jsonl'), 'w') as f:\n"
      "    for step, score in scores.items():\n"
      "      record = {'step': step, f'eval/scrolls_{task}/scrolls_score': score}\n"
      "      f.write(json.dumps(record) + '\\n')\n"
      "elif args[0] == '-c':\n"
      "  os.execv(sys.executable, [sys.executable] + args)\n",
  )
  output = tmp_path / "out"
  run_script(
      "finetune_all_scrolls.sh", "--model=models/colt5_base.gin", "--pretrained=/ckpt",
      f"--output_dir={output}", "--scrolls_data_dir=/data/scrolls",
      f"--python={fake_python}",
  )
  calls = [json.loads(line) for line in record.read_text().splitlines()]
  entry_calls = [c for c in calls if c[0] == "-m"]
  expected = []
  for task in TASKS:
    expected += [
        c[1:] for c in expected_finetune_commands(
            task, 2000, python="x", output=str(output), extra=(), initial="'/ckpt'"
        )
    ]
  assert entry_calls == expected
  # The best step was read with the real interpreter, then the CSV built from the
  # best checkpoints' predictions.
  assert sum(1 for c in calls if c[0] == "-c") == len(TASKS)
  assert calls[-1] == ["scripts/make_scrolls_submission.py"] + [
      f"--{t}={output}/predictions/scrolls_{t}-test-2000.jsonl" for t in TASKS
  ] + ["--scrolls_data_dir=/data/scrolls", f"--output_csv={output}/scrolls_submission.csv"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--pretrained=p", "--output_dir=o", "--no_submission"], {}, "--model"),
        (["--model=models/colt5_base.gin", "--output_dir=o", "--no_submission"], {},
         "--pretrained"),
        (["--model=models/nope.gin", "--pretrained=p", "--output_dir=o", "--no_submission"], {},
         "models/nope.gin"),
        (["--model=models/colt5_base.gin", "--pretrained=p", "--output_dir=o"],
         {"SCROLLS_DATA_DIR": ""}, "--scrolls_data_dir"),
        (["--model=models/colt5_base.gin", "--pretrained=p", "--output_dir=o", "--tasks=qaspr"],
         {}, "qaspr"),
    ],
)
def test_finetune_all_bad_arguments_are_named(args, env, message):
  result = run_script("finetune_all_scrolls.sh", *args, "--dry_run", env=env, check=False)
  assert result.returncode == 2 and message in result.stderr
