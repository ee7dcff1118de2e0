"""The benchmark's report: the Markdown table and the time/memory plot."""

from __future__ import annotations

from benchmarking import cases


def format_table(rows: list[dict]) -> str:
  """One row per case. `samples/s` is batch / time; `enc %` the encoder's share of an
  inference case's end-to-end time (the decoder has the rest); `kernel %` the share of
  the process's CPU time spent in the kernel during the timed runs, mostly the first
  touch of freshly allocated pages (`measure.time_runs`)."""
  header = (
      "| scope | model | mode | length | batch | ms | µs/token | samples/s | enc % "
      "| kernel % | compile s | peak MiB | GFLOP | GFLOP/s | % peak | % peak now | note |"
  )
  lines = [header, "|" + "|".join("---" for _ in range(17)) + "|"]
  lines += [format_row(row) for row in rows]
  return "\n".join(lines)


def format_row(row: dict) -> str:
  def number(value, spec):
    return "–" if value is None else format(value, spec)

  def percent(key):
    value = row.get(key)
    return number(None if value is None else 100 * value, ".0f")

  kernel = None
  if row.get("kernel_ms") is not None and row.get("cpu_ms"):
    kernel = 100 * row["kernel_ms"] / row["cpu_ms"]

  return (
      f"| {row['scope']} | {row['model']} | {row['mode']} | {row['length']} "
      f"| {row['batch']} | {number(row['ms'], '.1f')} "
      f"| {number(row.get('us_per_token'), '.1f')} "
      f"| {number(row.get('samples_per_s'), '.2f')} | {percent('encoder_share')} "
      f"| {number(kernel, '.0f')} "
      f"| {number(row['compile_s'], '.1f')} | {number(row['peak_mem_mb'], '.0f')} "
      f"| {row['flops'] / 1e9:.1f} | {number(row['achieved_gflops'], '.1f')} "
      f"| {percent('fraction_of_peak')} | {percent('fraction_of_peak_now')} | {row['note']} |"
  )


def plot(rows: list[dict], path: str) -> None:
  """Time and peak memory against length, log-log: a colour per model, solid circles for
  a layer, dashed squares for a whole encoder, dash-dotted triangles for a whole model's
  train step (up) or inference (down), dotted for peers; a column per mode."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  modes = [m for m in cases.MODES if any(r["mode"] == m for r in rows)]
  figure, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9), squeeze=False)
  styles = {"layer": "-", "encoder": "--", "train_step": "-.", "inference": "-."}
  markers = {"layer": "o", "encoder": "s", "train_step": "^", "inference": "v"}
  models = [*cases.kinds_of_scope("inference"), *(f"peer:{peer}" for peer in cases.PEERS)]
  # "C0".."C9" alone repeat after the tenth model, giving a peer a baseline's colour.
  palette = [f"C{i}" for i in range(10)] + ["black", "dimgray", "teal", "maroon", "olive"]
  colors = {model: palette[i % len(palette)] for i, model in enumerate(models)}
  for column, mode in enumerate(modes):
    series: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
      if row["mode"] == mode and not row["skipped"] and row["ms"] is not None:
        series.setdefault((row["model"], row["scope"], row["batch"]), []).append(row)
    batches = {batch for _, _, batch in series}
    for (model, scope, batch), points in sorted(series.items()):
      points.sort(key=lambda r: r["length"])
      lengths = [r["length"] for r in points]
      style = ":" if model.startswith("peer:") else styles[scope]
      label = f"{model} ({scope}{f', batch {batch}' if len(batches) > 1 else ''})"
      color, marker = colors.get(model), markers[scope]
      axes[0][column].plot(
          lengths, [r["ms"] for r in points], style, color=color, marker=marker, label=label
      )
      memory = [(r["length"], r["peak_mem_mb"]) for r in points if r["peak_mem_mb"]]
      if memory:
        axes[1][column].plot(
            *zip(*memory, strict=True), style, color=color, marker=marker, label=label
        )
    for row_index, ylabel in enumerate(("time per run (ms)", "peak memory (MiB)")):
      axis = axes[row_index][column]
      axis.set_xscale("log", base=2)
      axis.set_yscale("log")
      axis.set_xlabel("input length (tokens)")
      axis.set_ylabel(ylabel)
      axis.set_title(f"{mode}: {ylabel.split(' (')[0]}")
      axis.grid(True, which="both", alpha=0.3)
      axis.legend(fontsize=7)
  first = rows[0]
  figure.suptitle(f"width {first['width']}, batch {first['batch']}, {first['dtype']}")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
