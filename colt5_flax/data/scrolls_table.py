"""The seven SCROLLS tasks (Shaham et al., 2022): names, token lengths and metric, once.

The code (`scrolls`, `metrics`), the launchers and the tests read this table. It imports
only the standard library, so a shell script can ask for the names without the project's
dependencies:

    python3 colt5_flax/data/scrolls_table.py          # gov_report summ_screen_fd ...

Lengths are the paper's fine-tuning lengths (docs/paper.md, Training): inputs of 16384
tokens (ContractNLI 8192); targets of 1024 for GovReport, 512 for the other two
summarisation tasks and 128 for question answering and NLI. The metric is SCROLLS': the
geometric mean of ROUGE-1/2/L for summarisation, token F1 for Qasper and NarrativeQA,
exact match for QuALITY and ContractNLI.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ScrollsTask:
  """One SCROLLS task.

  Attributes:
    name: the official config name (`scrolls/<name>` in TFDS, `<name>.zip` released).
    input_length: input tokens (with EOS) the model reads.
    target_length: target tokens (with EOS) the model writes.
    metric: 'rouge', 'f1' or 'exact_match'.
  """

  name: str
  input_length: int
  target_length: int
  metric: str

  @property
  def feature_lengths(self) -> dict[str, int]:
    """`{'inputs': ..., 'targets': ...}`, seqio's `task_feature_lengths`."""
    return {"inputs": self.input_length, "targets": self.target_length}


TASKS = (
    ScrollsTask("gov_report", 16384, 1024, "rouge"),
    ScrollsTask("summ_screen_fd", 16384, 512, "rouge"),
    ScrollsTask("qmsum", 16384, 512, "rouge"),
    ScrollsTask("qasper", 16384, 128, "f1"),
    ScrollsTask("narrative_qa", 16384, 128, "f1"),
    ScrollsTask("quality", 16384, 128, "exact_match"),
    ScrollsTask("contract_nli", 8192, 128, "exact_match"),
)
NAMES = tuple(task.name for task in TASKS)
_BY_NAME = {task.name: task for task in TASKS}


def get(name: str) -> ScrollsTask:
  """The task `name`; ValueError naming the seven otherwise."""
  if name not in _BY_NAME:
    raise ValueError(f"Unknown SCROLLS task {name!r}; expected one of {list(NAMES)}")
  return _BY_NAME[name]


if __name__ == "__main__":
  print(" ".join(NAMES))
