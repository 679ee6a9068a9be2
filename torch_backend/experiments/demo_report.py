"""The demo's report: the markdown of one run and of a `--seeds N` run, the console summary, and
the statistics over seeds (experiments/demo.py writes the numbers; this module only reads them)."""
from __future__ import annotations

import pathlib

import numpy as np

from mugv.torch_backend.jobs.evaluate import ATTRIBUTES


HEADLINE = (("new", "t2v"), ("new", "baseline"), ("new", "no_caption"), ("new", "shuffled"), ("new", "majority"),
            ("new", "i2v"), ("new", "vae_recon"), ("seen", "t2v"), ("seen", "vae_recon"))


def seed_statistics(per_seed: list[dict]) -> dict:
    """{"new.t2v": {attribute: {"mean", "std", "values"}}, ..., "red": {...}}: over seeds, with
    std the sample standard deviation (ddof 1; 0 for one seed). "gain" = new t2v - baseline."""
    def stat(values):
        x = np.asarray(values, dtype=np.float64)
        return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                "values": [float(y) for y in x]}
    stats = {f"{g}.{k}": {a: stat([r[g][k][a] for r in per_seed]) for a in ATTRIBUTES} for g, k in HEADLINE}
    stats["gain"] = {a: stat([r["new"]["t2v"][a] - r["new"]["baseline"][a] for r in per_seed]) for a in ATTRIBUTES}
    stats["red"] = {k: stat([_share(r["colours"][k].get("red", [0, 0])) for r in per_seed])
                    for k in ("t2v", "vae_recon")}
    return stats


def _share(hits: list[int]) -> float:
    return hits[0] / hits[1] if hits[1] else float("nan")


def summary(results: dict) -> str:
    new, seen = results["new"], results["seen"]
    lines = [f"scored on the {results['score']} splits: {results['prompts']['new']} prompts of compositions never "
             f"trained, {results['prompts']['seen']} trained captions",
             "attribute  baseline  t2v new  gain    i2v new  t2v seen  VAE recon"]
    for a in ATTRIBUTES:
        lines.append(f"{a:<10} {new['baseline'][a]:7.1%}  {new['t2v'][a]:7.1%}  {100 * (new['t2v'][a] - new['baseline'][a]):+5.1f}  "
                     f"{new['i2v'][a]:7.1%}  {seen['t2v'][a]:7.1%}  {new['vae_recon'][a]:8.1%}")
    red = results["colours"]["t2v"].get("red", [0, 0])
    v_ = results["vae"]
    if "curation" in results:
        c = results["curation"]["counts"]
        lines.insert(0, f"curated training data: {c['kept']} of {c['clips']} clips kept ({results['curation']['report']})")
    lines.append(f"red prompts made red: {red[0]} of {red[1]}; VAE PSNR {v_['psnr']:.2f} dB (untrained "
                 f"{v_['untrained_psnr']:.2f} dB); wall time {results['seconds']['total']:.0f} s")
    return "\n".join(lines)


MEANING = {
    "new": "Share of prompts whose caption value the analyzer reads in the sample, for prompts whose "
           "colour x shape x motion combination never occurs in training (each value and each other "
           "pair does).",
    "baseline": "The strongest text-blind answer: the same model sampled with every text token "
                "masked (no caption), with another prompt's caption (shuffled), or always the prompts' "
                "most frequent value (majority); gain = t2v minus the best of the three.",
    "seen": "Recall: the same measure for new clips' prompts whose captions occur verbatim in training.",
}


def write_report(cfg, results: dict, captions: list[str], n: int, out: pathlib.Path) -> None:
    from mugv.core.validate import to_dict
    from mugv.torch_backend.jobs import report

    new, seen = results["new"], results["seen"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rows = [[a, pct(new["majority"][a]), pct(new["no_caption"][a]), pct(new["shuffled"][a]), pct(new["baseline"][a]),
             f"**{pct(new['t2v'][a])}**", f"{100 * (new['t2v'][a] - new['baseline'][a]):+.1f}", pct(new["i2v"][a]),
             pct(new["vae_recon"][a]), pct(new["real"][a])] for a in ATTRIBUTES]
    acc = report.table(["attribute", "majority", "no caption", "shuffled caption", "baseline", "t2v", "gain",
                        "i2v", "VAE reconstructions", "real clips"], rows)
    comps = ", ".join(" ".join(t) for t in results["compositions"]["new"])
    seen_rows = [[a, f"**{pct(seen['t2v'][a])}**", pct(seen["vae_recon"][a]), pct(seen["real"][a])] for a in ATTRIBUTES]
    colours = results["colours"]
    colour_rows = [[c, *(f"{colours[k].get(c, [0, 0])[0]} / {colours[k].get(c, [0, 0])[1]}"
                         for k in ("t2v", "vae_recon", "real"))] for c in cfg.data.colours]
    secs = results["seconds"]
    timing = report.table(["step", "seconds"], [[k, f"{x:.0f}"] for k, x in secs.items()])
    v_ = results["vae"]
    prompts = "\n".join(f"{i}. {c}" for i, c in enumerate(captions[:n]))
    split = results["score"]
    sections = [
        ("New compositions", f"{MEANING['new']} {MEANING['baseline']} Scored on the `{split}_new` split: "
         f"{results['prompts']['new']} prompts over the compositions {comps} (training had "
         f"{results['compositions']['train']}). i2v samples start from the real clip's first frame, so their "
         "colour and shape are given; their motion is not.\n\n" + acc),
        ("Seen captions", f"{MEANING['seen']} `{split}_seen` split, {results['prompts']['seen']} prompts.\n\n"
         + report.table(["attribute", "t2v", "VAE reconstructions", "real clips"], seen_rows)),
        ("Per colour", "Prompts (new and seen) whose colour the analyzer reads in the clip, per colour: "
         "hits / prompts.\n\n" + report.table(["colour", "t2v", "VAE reconstructions", "real clips"], colour_rows)),
        ("VAE", f"PSNR on the {cfg.data.held_out if split == 'eval' else cfg.data.val} `{split}_new` clips "
         f"({cfg.data.frames} frames, {cfg.data.size} px): **{v_['psnr']:.2f} dB** (untrained: "
         f"{v_['untrained_psnr']:.2f} dB), SSIM {v_['ssim']:.3f}, after {v_['steps']} steps "
         f"({', '.join(f'{k} {m}' for k, m in v_['stage_steps'].items())}; docs/vae.md). Side-by-side "
         f"originals/reconstructions: [vae/{split}_new/](vae/{split}_new/). Loss: ![VAE loss](media/vae_loss_curve.png)"),
        ("Training loss", "![loss curve](media/loss_curve.png)\n\nPer-step metrics: `pretrain/stages/*/metrics.jsonl` "
         "(TensorBoard events next to them). Dotted lines: steps where the samples below were written."),
        ("Samples during training", _previews_section(results.get("previews", {}), out)),
        ("Samples", f"Rows = new-composition prompts 0..{n - 1}, columns = frames evenly spaced over the clip.\n\n"
         f"{prompts}\n\nReal clips: ![real](media/held_out_grid.png)\n\ntext-to-video: ![t2v](media/t2v_grid.png)\n\n"
         "image-to-video: ![i2v](media/i2v_grid.png)\n\nno caption (text-blind): ![no caption](media/no_caption_grid.png)"
         "\n\nseen captions (other prompts): ![seen](media/seen_t2v_grid.png)\n\nVideos (real | t2v | i2v): "
         + ", ".join(f"[t2v_{i}.mp4](media/t2v_{i}.mp4)" for i in range(min(4, n)))),
        ("Wall time", timing),
    ]
    if "preference" in results:
        sections.insert(5, ("Preference stage", _preference_section(results["preference"])))
    if "curation" in results:
        sections.insert(0, ("Curation", _curation_section(results["curation"], out)))
    report.markdown_report(out / "report.md", "mugv demo report", sections, config=to_dict(cfg))


def write_seeds_report(cfg, stats: dict, out: pathlib.Path) -> None:
    from mugv.core.validate import to_dict
    from mugv.torch_backend.jobs import report

    f = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    names = {"new.t2v": "**t2v, new compositions**", "new.baseline": "text-blind baseline (best of the three)",
             "gain": "**gain of t2v over the baseline**", "new.no_caption": "no caption", "new.shuffled": "shuffled caption",
             "new.majority": "majority value", "new.i2v": "i2v, new compositions",
             "new.vae_recon": "VAE reconstructions, new", "seen.t2v": "**t2v, seen captions (recall)**",
             "seen.vae_recon": "VAE reconstructions, seen"}
    rows = [[label, *(f(stats[key][a]) for a in ATTRIBUTES)] for key, label in names.items()]
    red = [[k, f(stats["red"][k]), ", ".join(f"{100 * x:.0f}" for x in stats["red"][k]["values"])] for k in ("t2v", "vae_recon")]
    sections = [
        ("Over seeds", f"{MEANING['new']} {MEANING['baseline']} {MEANING['seen']} Mean ± sample standard deviation "
         f"over {cfg.seeds} data/training seeds ({cfg.data.seed} .. {cfg.data.seed + cfg.seeds - 1}), in percent, "
         f"scored on the `{cfg.score}` splits; each seed's report: seed_<k>/report.md.\n\n"
         + report.table(["", *ATTRIBUTES], rows)),
        ("Red", "Share of red prompts (new and seen) whose sample / reconstruction the analyzer reads as red.\n\n"
         + report.table(["", "mean ± sd (%)", "per seed (%)"], red)),
    ]
    report.markdown_report(out / "report.md", f"mugv demo over {cfg.seeds} seeds", sections, config=to_dict(cfg))


def _curation_section(cur: dict, out: pathlib.Path) -> str:
    """`--curated`: what `mugv curate` kept and rejected of the training sources, and how well it
    found what the generator planted (data/curation/evaluate.py)."""
    from mugv.torch_backend.jobs import report

    c, spec = cur["counts"], cur["spec"]
    frac = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    filters = report.table(["filter", "rejected (any reason)", "rejected (first reason)"],
                           [[k, n, c["rejected_by_first_reason"].get(k, 0)] for k, n in sorted(c["rejected_by_filter"].items())])
    sh = cur["shots"]
    bounds = report.table(["boundaries", "precision", "recall", "found / true"],
                          [["all", frac(sh["all"]["precision"]), frac(sh["all"]["recall"]),
                            f"{sh['all']['matched']} / {sum(sh[k]['total'] for k in ('cut', 'fade', 'dissolve'))}"]]
                          + [[k, "", frac(sh[k]["recall"]), f"{sh[k]['found']} / {sh[k]['total']}"]
                             for k in ("cut", "fade", "dissolve")])
    f = cur["filters"]
    planted = report.table(["filter", "planted defect", "precision", "recall"],
                           [["sharpness", "blur", frac(f["sharpness"]["precision"]), frac(f["sharpness"]["recall"])],
                            ["motion", "static, shake", frac(f["motion"]["precision"]), frac(f["motion"]["recall"])],
                            ["dedup", "exact, near duplicates", frac(f["dedup"]["precision"]), frac(f["dedup"]["recall"])]])
    clean = f["clean_rejected"]
    seen = cur.get("seen_in_train", [0, 0])
    spans = cur.get("kept_rows")
    spans = (f"{spans['transition_centre']} of the {spans['rows']} kept clips hold a true transition's centre "
             f"(a missed boundary: two scenes, one caption), {spans['transition_edge']} some frames of one at an end"
             + (f" (at most {max(spans['edge_depth_s']):.2f} s)" if spans.get("edge_depth_s") else "") + ". "
             if spans else "")
    return (f"The training split was curated (`--curated`): {c['sources']} sources of {spec['shots']} shots "
            f"({spec['size']} px, {spec['shot_frames'][0]}-{spec['shot_frames'][1]} frames a shot, defects planted "
            f"in {spec['defect_rate']:.0%} of shots after the first source), only training compositions. "
            f"{c['clips']} clips, **{c['kept']} kept** ({c['manifest_rows']} manifest rows, time ranges of their "
            f"sources), {c['duplicate_groups']} duplicate groups; {clean['rejected']} of {clean['clean']} clean "
            f"clips rejected ({', '.join(f'{k} {n}' for k, n in clean['by'].items()) or 'none'}). "
            f"{spans}Seen-split captions that occur in the curated training manifest: {seen[0]} / {seen[1]}. "
            f"Curation report: [{cur['report']}]({cur['report']}).\n\n" + filters
            + "\n\nShot boundaries against the generator's truth (centres within 0.3 s):\n\n" + bounds
            + "\n\nFilters against the planted defects:\n\n" + planted)


def _preference_section(summary: dict) -> str:
    """Held-out caption following of the pretrained checkpoint and after each preference
    objective, mean ± sd over seeds (details: preference/report.md)."""
    from mugv.torch_backend.jobs import report

    rows = []
    for objective, table in summary.items():
        for a, s in table.items():
            f = lambda x: f"{100 * x['mean']:.1f} ± {100 * x['std']:.1f} %"  # noqa: E731
            rows.append([objective.upper(), a, f(s["before"]), f(s["after"]), f(s["gain"])])
    return ("Preferences made by the analyzer on training prompts, then the stage from the pretrained "
            "checkpoint; accuracy on held-out prompts (mean ± sd over seeds). Runs, data and settings: "
            "[preference/report.md](preference/report.md).\n\n"
            + report.table(["objective", "attribute", "before", "after", "gain"], rows))


def _previews_section(previews: dict[str, list[str]], out: pathlib.Path) -> str:
    """Per stage, the sample grids written while it trained (PretrainConfig.sample_every), each
    with its mp4: the same prompts and noise every time, so the rows show what training changed."""
    if not any(previews.values()):
        return "None written (`pretrain.sample_every` = 0)."
    lines = []
    for stage, pngs in previews.items():
        if not pngs:
            continue
        prompts = pathlib.Path(pngs[0]).parent / "prompts.txt"
        lines.append(f"**{stage}** (prompts: [{prompts}]({prompts}); rows = prompts, columns = frames)\n")
        for png in pngs:
            step = int(pathlib.Path(png).stem[5:])
            lines.append(f"- step {step}: [mp4]({png[:-4]}.mp4)\n\n  ![{stage} step {step}]({png})")
    return "\n".join(lines)
