"""The Markdown report of :mod:`corruption_reference`: one table for the deterministic corruptions
(pixel agreement with the reference generator), one for the random ones (perturbation size and a
fixed classifier's error, ours against the reference), and the per-corruption summary."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_tables(rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Images: {meta['n_eval']} held-out images of {meta['data']}; classifier {meta['arch']} "
        f"(trained on {meta['n_train']} images, clean error {100 * meta['clean_error']:.1f}%).",
        "",
        "Deterministic corruptions: mean |ours - reference| in uint8 levels.",
        "",
        "| corruption | s | MAD | max | pixels differing | err ours % | err ref % | target | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "deterministic":
            continue
        lines.append(
            f"| {r['corruption']} | {r['severity']} | {r['mad_ours_ref']:.3f} | {r['max_abs_ours_ref']} | "
            f"{100 * r['frac_pixels_differ']:.1f}% | {100 * r['error_ours']:.1f} | {100 * r['error_ref']:.1f} | "
            f"{r['target']} | {'yes' if r['passed'] else 'NO'} |"
        )
    lines += [
        "",
        "Random corruptions: mean |corrupted - clean| (levels) and classifier error; d err = ours - ref "
        "(points), with the paired standard error; binomial std of one error is given too. "
        "MAD, shared draws: ours fed the reference's own random draws (where we can replay them).",
        "",
        "| corruption | s | pert ours | pert ref | rel diff | err ours % | err ref % | d err (pt) | paired std | binom std | pass (0.5 pt) | within 2 std | MAD, shared draws |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "random":
            continue
        flag = " (!)" if r["perturbation_flag"] else ""
        lines.append(
            f"| {r['corruption']} | {r['severity']} | {r['perturbation_ours']:.2f} | {r['perturbation_ref']:.2f} | "
            f"{100 * r['perturbation_rel_diff']:+.1f}%{flag} | {100 * r['error_ours']:.1f} | {100 * r['error_ref']:.1f} | "
            f"{r['error_diff_points']:+.1f} | {r['error_diff_paired_std_points']:.1f} | "
            f"{r['error_binomial_std_points']:.1f} | {'yes' if r['passed'] else 'NO'} | "
            f"{'yes' if r['within_2_std'] else 'NO'} | {_fmt(r['mad_shared_draws'], '.3f')} |"
        )
    lines += [
        "",
        "Per corruption (5 severities pooled) and throughput on this machine (same images, images/s; "
        "the reference includes its driver's per-image ToTensor/ToPILImage).",
        "",
        "| corruption | kind | max MAD | pert ours | pert ref | mean d err (pt) | std | cells passed | ref img/s | ours img/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['corruption']} | {s['kind']} | {s['max_mad_ours_ref']:.3f} | {s['mean_perturbation_ours']:.2f} | "
            f"{s['mean_perturbation_ref']:.2f} | {s['mean_error_diff_points']:+.2f} | {s['mean_error_diff_std_points']:.2f} | "
            f"{s['cells_passed']}/{s['cells']} | {s['ref_images_per_s']:.0f} | {s['ours_images_per_s']:.0f} | "
            f"{s['speedup']:.1f}x |"
        )
    spread_rows = [r for r in rows if r.get("draw_spread")]
    if spread_rows:
        lines += [
            "",
            f"Draw-to-draw spread ({spread_rows[0]['draw_spread']['error_points']['draws']} draws per generator, seeds "
            "seed..seed+K-1): mean ± std over draws of the classifier error (%) and of the perturbation "
            "(levels); 'in range': our mean lies within the reference's [min, max] over its draws; "
            "d = ours - ref with the standard error of a difference of two K-draw means.",
            "",
            "| corruption | s | err ours | err ref | ref range | in range | d err (pt) | se | pert ours | pert ref | in range | d pert | se |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        pooled_rows = [{"corruption": p["corruption"], "severity": "all", "draw_spread": p["draw_spread"]} for p in summary if p.get("draw_spread")]
        for r in spread_rows + pooled_rows:
            e, p = r["draw_spread"]["error_points"], r["draw_spread"]["perturbation"]
            lines.append(
                f"| {r['corruption']} | {r['severity']} | {e['ours_mean']:.2f} ± {e['ours_std']:.2f} | "
                f"{e['ref_mean']:.2f} ± {e['ref_std']:.2f} | {e['ref_min']:.2f}-{e['ref_max']:.2f} | "
                f"{'yes' if e['ours_mean_within_ref_range'] else 'NO'} | {e['diff']:+.2f} | {e['diff_se']:.2f} | "
                f"{p['ours_mean']:.3f} ± {p['ours_std']:.3f} | {p['ref_mean']:.3f} ± {p['ref_std']:.3f} | "
                f"{'yes' if p['ours_mean_within_ref_range'] else 'NO'} | {p['diff']:+.3f} | {p['diff_se']:.3f} |"
            )
    if meta.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items())]
    return "\n".join(lines) + "\n"
