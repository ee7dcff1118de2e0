"""The task registry: importing this module registers every task of the project.

Gin files import it (`import colt5_flax.data.tasks`) and then name tasks by string:

- synthetic (byte vocabulary, no files; the tests' and benchmarks' task):
  `synthetic_kv_retrieval` (2048 tokens) and `synthetic_kv_retrieval_<length>` for
  lengths 1024 ... 65536 (`synthetic.register_synthetic_task` makes others);
- the demo's associative recall (byte vocabulary, no files): `associative_recall_demo_2048`
  (`recall.register_demo_task` makes other lengths);
- SCROLLS via TFDS `scrolls/<config>:1.0.0`: `scrolls_<task>` (T5 SentencePiece),
  `scrolls_<task>_byte` (bytes); mixtures `scrolls`, `scrolls_byte`;
- SCROLLS from the official files in $SCROLLS_DATA_DIR: `scrolls_<task>_local`,
  `scrolls_<task>_local_byte`; mixtures `scrolls_local`, `scrolls_local_byte`;
- UL2 pretraining on TFDS `c4/en:3.0.1`: `ul2_c4` (T5 SentencePiece); on local text
  files, `ul2.register_ul2_text_task(name, file_pattern)`; the PEGASUS ablation (CoLT5
  Table 6): `pegasus_c4`.

with `<task>` one of gov_report, summ_screen_fd, qmsum, qasper, narrative_qa, quality,
contract_nli. Registration replaces existing entries, so importing or reloading twice
never raises, and it reads no file: the SentencePiece model is loaded at first use.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio

from colt5_flax.data import pegasus, recall, scrolls, synthetic, ul2, vocabularies

_DEFAULT_TASKS: list[str] = []


def register_default_tasks() -> list[str]:
  """Registers (or re-registers) every default task and mixture; returns their names."""
  names = synthetic.register_default_tasks()
  names.append(recall.register_demo_task())
  byte_vocabulary = vocabularies.byte_vocabulary()
  names += scrolls.register_scrolls_tasks()
  names.append("scrolls")
  names += scrolls.register_scrolls_tasks(byte_vocabulary, name_suffix="_byte")
  names.append("scrolls_byte")
  names += scrolls.register_scrolls_local_tasks()
  names.append("scrolls_local")
  names += scrolls.register_scrolls_local_tasks(vocabulary=byte_vocabulary, name_suffix="_byte")
  names.append("scrolls_local_byte")
  names.append(ul2.register_ul2_c4_task().name)
  names.append(pegasus.register_pegasus_c4_task().name)
  _DEFAULT_TASKS[:] = names
  return names


def default_task_names() -> list[str]:
  """The names `register_default_tasks` registered (tasks and mixtures)."""
  return list(_DEFAULT_TASKS)


def registered_task_names() -> list[str]:
  """Every task and mixture name seqio knows (ours and any registered since), sorted."""
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_task(name: str) -> seqio.Task | seqio.Mixture:
  """The registered seqio task or mixture `name` (gin: `MIXTURE_OR_TASK_NAME`).

  Raises:
    ValueError: for a name that is not a string, or an unknown one (listing the
      registered ones).
  """
  if not isinstance(name, str):
    raise ValueError(f"A task or mixture name (MIXTURE_OR_TASK_NAME) is a string, got {name!r}")
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  raise ValueError(
      f"Unknown task or mixture {name!r} (MIXTURE_OR_TASK_NAME); registered: "
      f"{', '.join(registered_task_names())}. Tasks register when the module defining them "
      "is imported: does a gin file import it?"
  )


class EncDecFeatureConverterWithPassthrough(seqio.EncDecFeatureConverter):
  """Unpacked `EncDecFeatureConverter` that also carries the named extra features.

  Rank-1 features (e.g. the synthetic task's `relevant_mask` [length]) are cut or padded
  to their `task_feature_lengths` entry like the model features; rank-0 features (e.g.
  SCROLLS' `id`) pass unchanged and need no length (stock seqio would try to slice them).

  Args:
    passthrough_features: `{name: seqio.FeatureConverter.FeatureSpec}`.
    **kwargs: other `EncDecFeatureConverter` arguments (`pack` is always False: seqio
      cannot pack passthrough features).
  """

  def __init__(
      self, passthrough_features: Mapping[str, seqio.FeatureConverter.FeatureSpec], **kwargs
  ):
    super().__init__(pack=False, passthrough_features=dict(passthrough_features), **kwargs)

  def _scalar_features(self) -> list[str]:
    return [k for k, spec in self._passthrough_features.items() if spec.rank == 0]

  def __call__(self, ds, task_feature_lengths):
    lengths = dict(task_feature_lengths)
    for name in self._scalar_features():
      lengths.setdefault(name, 0)  # never used: seqio skips length checks at rank 0
    return super().__call__(ds, lengths)

  def _convert_features(self, ds, task_feature_lengths):
    lengths = {
        k: v for k, v in task_feature_lengths.items() if k not in self._scalar_features()
    }
    return super()._convert_features(ds, lengths)


register_default_tasks()
