"""bench/results/embedding.png from embedding.json's figures: offline titles/s by batch size
and backend; served titles/s by layout against the offline ceilings."""

from __future__ import annotations

from pathlib import Path

from export import encoder as enc


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    offline_panel(left, results)
    served = results.get("served")
    if served and "configs" in served:
        served_panel(right, served)
    else:
        right.text(0.5, 0.5, "served part not run", ha="center", va="center")
        right.set_axis_off()
    busiest = max(results["foreign_cpu_share"].values(), default=0.0)
    fig.suptitle(f"{results['params']['model']} on {results['machine']['cpu_model']}, "
                 f"{results['machine']['cores']} cores; other processes used up to "
                 f"{busiest:.0%} of them", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def offline_panel(left, results: dict) -> None:
    sizes = results["params"]["batch_sizes"]
    for backend, label in (("torch_fp32", "torch eager fp32"), ("ort_fp32", "ORT fp32"),
                           ("ort_int8", "ORT int8")):
        ys = [results["offline"][str(b)][backend]["titles_per_s"] for b in sizes]
        left.plot(sizes, ys, marker="o", label=label)
    pad = results["offline"]["32"].get("ort_fp32_pad128")
    if pad:
        left.scatter([32], [pad["titles_per_s"]], marker="x", color="black", zorder=3,
                     label="ORT fp32, fixed 128 padding")
    srt = results["offline"]["32"].get("ort_fp32_sorted")
    if srt:
        left.scatter([32], [srt["titles_per_s"]], marker="^", color="tab:orange", zorder=3,
                     label="ORT fp32, length-sorted batches")
    tops = [c["titles_per_s"] for st in results["offline"].values() for k, c in st.items()
            if k != "cpu_share"]
    left.set_ylim(0, max(tops) * 1.45)  # room for the legend above the points
    left.set_xscale("log", base=2)
    left.set_xticks(sizes, [str(b) for b in sizes])
    left.set_xlabel("batch size (titles, padded to longest)")
    left.set_ylabel("titles / s (model call)")
    left.set_title("Offline, real Amazon titles")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, ncol=2, loc="upper center")


def served_panel(right, served: dict) -> None:
    names = list(served["configs"])
    tput = [served["configs"][n]["titles_per_s"] for n in names]
    bars = right.bar(range(len(names)), tput, color=["#3a7", "#38c", "#9b6", "#999"])
    for m, color in ((enc.FP32_NAME, "#3a7"), (enc.INT8_NAME, "#38c")):
        right.axhline(served["offline_ceiling"][m]["titles_per_s"], color=color, ls="--",
                      lw=1, label=f"offline ceiling {m}")
    for bar, n in zip(bars, names):
        c = served["configs"][n]
        right.annotate(f"{c['vs_offline_ceiling']:.0%} of ceiling\n"
                       f"p99 {c['p99_ms']:.0f} ms",
                       (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                       ha="center", va="bottom", fontsize=7)
    right.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names],
                     fontsize=7)
    right.set_ylabel("titles / s")
    right.set_title(f"Served, {served['concurrency']} callers x 1 title", fontsize=10)
    right.legend(fontsize=7, loc="upper right")
    right.margins(y=0.3)
