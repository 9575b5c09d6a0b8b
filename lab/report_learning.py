"""The learning sections of ``docs/benchmarks.md``: Figure 4 (``datafraction``), the
fidelity of the feature-space expansion (``expansion``) and the paper-sized job through
the pipeline (``paper-job``). Pure: strings out, nothing read or written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lab.report_data import Report, dig, num, open_section, seconds, table

#: The paper's Figure 4 (FedEx, HotMobile'20), read off its plot: accuracy of the
#: retrained classifier at each fraction of the 437,855 additional features.
PAPER_SHAPE = "rises steeply to ~25% of the data, then flattens"


def _mean_std(cell: Mapping[str, Any] | None) -> str:
    if not cell:
        return "—"
    return f"{num(cell.get('mean'))} ± {num(cell.get('std'), 2)}"


def section_datafraction(report: Report, img: str | None, name: str = "datafraction") -> str:
    r = report.results[name]
    at_paper_size = name.endswith("-paper")
    title = "Figure 4 analog: accuracy vs fraction of additional user data"
    out, data = open_section(r, title + (", at the paper's size" if at_paper_size else ""))
    if data is None:
        return out
    bank, recipe = data.get("bank", {}), data.get("recipe", {})
    world = (
        f"an expanded world at scale {data.get('scale')} of the paper "
        f"({num(bank.get('identities'))} identities, sampled from the feature model fitted on "
        f"`{bank.get('fitted_on')}`)"
        if data.get("scale") is not None
        else f"the real bank `{bank.get('file', '?')}`"
    )
    out += (
        f"On {world}, {bank.get('backbone', '?')} at {bank.get('cut', '?')} with the "
        f"pretrained FaceNet weights. The base head v0 is trained on the pre-training "
        f"identities (clean camera), then retrained from v0 on a fraction of the devices' "
        f"training features; accuracy on the devices' held-out features (never trained on), "
        f"{len(data.get('seeds', []))} seeds (mean ± std), {recipe.get('epochs', '?')} epochs "
        f"AdamW lr {recipe.get('lr', '?')}. Arms: `user` = retrained on the user data alone; "
        "`pretrain+user` = with the pre-training data; `system` = what the product ships "
        "(the `user` head only where it beats v0 on a fixed validation set by the trainer's "
        "margin, else v0); `user+swa` = the `user` recipe with dense weight averaging. "
        "Vendor spread = best - worst vendor's accuracy. 0% is v0. The paper's curve "
        f"{PAPER_SHAPE}.\n\n"
    )
    if img:
        out += f"![accuracy vs fraction of additional data]({img})\n\n"
    curves = data.get("curves", {})
    arms = list(curves)
    fractions = [row["fraction"] for row in curves[arms[0]]] if arms else []
    rows = []
    for i, f in enumerate(fractions):
        row: list[Any] = [f"{f:.0%}", num(dig(curves, arms[0], i, "user_samples"))]
        for arm in arms:
            row.append(_mean_std(dig(curves, arm, i, "device_accuracy")))
        rows.append(row)
    out += table(["fraction", "user samples", *arms], rows) + "\n\n"
    vendor_rows = []
    for i, f in enumerate(fractions):
        row = [f"{f:.0%}"]
        for arm in arms:
            spread = dig(curves, arm, i, "vendor_spread", "mean")
            worst = dig(curves, arm, i, "worst_vendor_accuracy", "mean")
            row.append(f"{num(spread)} (worst {num(worst)})")
        vendor_rows.append(row)
    out += "Vendor spread (worst vendor's accuracy), mean over seeds:\n\n"
    out += table(["fraction", *arms], vendor_rows) + "\n\n"
    pre = [
        [f"{f:.0%}", *(num(dig(curves, a, i, "pretrain_accuracy", "mean")) for a in arms)]
        for i, f in enumerate(fractions)
    ]
    out += "Accuracy on the pre-training identities' clean held-out features (forgetting):\n\n"
    out += table(["fraction", *arms], pre)
    out += f"\n\nReproduce: `{r.command}`"
    return out + ("." if at_paper_size else " (`--scale paper` for the paper's size).")


def section_expansion(report: Report) -> str:
    r = report.results["expansion"]
    out, data = open_section(r, "Feature-space expansion: fidelity")
    if data is None:
        return out
    bank = data.get("bank", {})
    out += (
        f"Fitted on the real bank `{bank.get('file', '?')}` ({num(bank.get('rows'))} real "
        f"backbone features, {num(bank.get('identities'))} identities), "
        f"{len({row['seed'] for row in data.get('rows', [])})} seeds × "
        f"{len({row['model_id'] for row in data.get('rows', [])})} models. *Twin*: every train "
        "feature replaced by a draw of its cell, heads tested on the real held-out features. "
        "*New identities*: a world of the same size whose identities are all new draws, "
        "tested on its own held-out draws. Gap = sampled - real (accuracy).\n\n"
    )
    rows = []
    for f, e in (data.get("summary") or {}).items():
        rows.append(
            [
                f"{float(f):.0%}",
                num(e.get("real")),
                num(e.get("twin_tested_on_real")),
                f"{num(e.get('twin_tested_on_real_gap'), 2)} "
                f"(max {num(e.get('twin_tested_on_real_max_abs_gap'), 2)})",
                num(e.get("new_identities")),
                f"{num(e.get('new_identities_gap'), 2)} "
                f"(max {num(e.get('new_identities_max_abs_gap'), 2)})",
            ]
        )
    headers = ["user data", "real", "twin on real", "gap", "new identities", "gap"]
    return out + table(headers, rows) + f"\n\nReproduce: `{r.command}`."


def section_paper_job(report: Report, name: str = "paper-job") -> str:
    r = report.results[name]
    size = "at the paper's size" if name.endswith("-paper") else "at a tenth of the paper"
    out, d = open_section(r, f"One paper-sized job through the pipeline, {size}")
    if d is None:
        return out
    path = d.get("data_path", {})
    out += (
        f"{num(d.get('pushed_samples'))} features of {num(d.get('identities'))} identities "
        f"(scale {d.get('scale')} of the paper's 437,855 × 8,631) pushed as "
        f"{num(d.get('pushes'))} pushes, one trigger, the real trainer on {d.get('device')}, "
        f"{d.get('epochs')} epochs on {num(d.get('train_samples'))} of them; the trainer's "
        f"validation rule holds {num(d.get('val_samples'))} out (whole devices and a share of "
        "the others' samples). The paper: 231 s on a Titan Xp.\n\n"
    )
    rows = [
        ["produce (acknowledged)", seconds(d.get("produce_s")), ""],
        [
            "log read + decode (cold, second reader)",
            seconds(path.get("read_decode_s")),
            f"{num(path.get('samples_per_s'))} samples/s",
        ],
        ["first-copy select", seconds(path.get("select_dedupe_s")), ""],
        ["trigger → version seen", seconds(d.get("job_s")), ""],
        [
            "of which training",
            seconds(d.get("train_seconds")),
            f"{num(d.get('train_samples_per_s'))} samples/s",
        ],
        [
            "devices' held-out accuracy v0 → version",
            "",
            f"{num(d.get('v0_device_accuracy'))} → {num(d.get('version_device_accuracy'))}",
        ],
    ]
    return out + table(["step", "time", ""], rows) + f"\n\nReproduce: `{r.command}`."
