"""`mugv generate-data`: the embedded product-video dataset (mp4 + manifests) the demo trains on.

The vocabulary is cut down from the full product generator (`data/product_videos.py`) so that a
tiny DiT can learn it on a 2-core CPU in minutes: a few colours, shapes and motions, matte objects
on light backgrounds, 32x32 px, 17 frames. Captions are short ("a red sphere, the camera pans
left") so that the byte-level embedded text encoder keeps every word within its token budget.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from mugv.core import validate as v


@dataclasses.dataclass(frozen=True)
class DemoData:
    """The demo's clips: which attribute values appear, which combinations are kept out of
    training, how many clips, their size and length.

    colours / shapes / motions / backgrounds: the vocabulary (names from data/product_videos.py).
    held_out_pairs: "colour shape" pairs never shown in training with any motion (e.g. no green
        cone ever, though green things and cones are); their triples are evaluation compositions.
    held_out_triples: further (colour, shape, motion) triples, drawn with `seed`, kept out of
        training and evaluated; val_triples: others kept out of training and used only for
        validation (choosing settings), never evaluated. The draw keeps every value, and every
        colour x shape, colour x motion and shape x motion pair other than `held_out_pairs`, in
        training, so an unseen triple is a new composition of seen parts.
    count: training clips, spread over the training triples.
    held_out: clips per evaluation split: "eval_new" (the held-out compositions, balanced over
        them) and "eval_seen" (new clips whose captions occur verbatim in training: recall).
    val: clips per validation split ("val_new", "val_seen"), the same way.
    """

    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("sphere", "cone", "cylinder")
    motions: tuple[str, ...] = ("zoom in", "pan left", "pan right")
    backgrounds: tuple[str, ...] = ("white studio", "light grey")
    held_out_pairs: tuple[str, ...] = ("green cone",)
    held_out_triples: int = 6
    val_triples: int = 3
    count: int = 192
    held_out: int = 27
    val: int = 24
    size: int = 32
    frames: int = 17
    fps: float = 16.0
    seed: int = 0

    def __post_init__(self) -> None:
        from mugv.torch_backend.data import product_videos as pv
        for field, allowed in (("colours", pv.COLOURS), ("shapes", pv.SHAPES), ("motions", pv.MOTIONS),
                               ("backgrounds", pv.BACKGROUNDS)):
            values = getattr(self, field)
            if not isinstance(values, tuple) or not values or any(x not in allowed for x in values):
                v.fail(self, field, f"a non-empty tuple of names from {sorted(allowed)}")
        if not isinstance(self.held_out_pairs, tuple):
            v.fail(self, "held_out_pairs", 'a tuple of "colour shape" strings')
        for pair in self.held_out_pairs:
            colour, _, shape = str(pair).partition(" ")
            if colour not in self.colours or shape not in self.shapes:
                v.fail(self, "held_out_pairs", f'"colour shape" pairs from colours {list(self.colours)} and '
                       f"shapes {list(self.shapes)}, or [] for none; got {pair!r}")
        v.non_negative_int(self, "held_out_triples", "seed")
        v.positive_int(self, "val_triples")
        if not self.held_out_pairs and not self.held_out_triples:
            v.fail(self, "held_out_triples", "> 0 when held_out_pairs is empty (nothing would be evaluated)")
        v.positive_int(self, "count", "held_out", "val", "size", "frames")
        if self.size % 16:
            v.fail(self, "size", "a multiple of 16 (VAE 8 x DiT patch 2)")
        v.in_range(self, "fps", 0, 240, lo_open=True)
        self.compositions()   # a split that cannot be drawn is a config error, named here

    @property
    def chance(self) -> dict[str, float]:
        return {"colour": 1 / len(self.colours), "shape": 1 / len(self.shapes), "motion": 1 / len(self.motions)}

    def compositions(self) -> dict[str, list[tuple[str, str, str]]]:
        """{"train", "eval", "val"}: (colour, shape, motion) triples, disjoint, drawn with `seed`
        (see the class doc). The held-out triples spread each attribute's values as evenly as
        the counts allow (no value more than ceil(n / values) times among eval's triples, the
        held_out_pairs' included; val likewise), so that always answering one value scores
        little; the first such draw that keeps every pair in training is taken. Raises
        ConfigError when none does."""
        import itertools
        vocab = (self.colours, self.shapes, self.motions)
        triples = list(itertools.product(*vocab))
        pairs = {tuple(p.split(" ", 1)) for p in self.held_out_pairs}
        fixed = [t for t in triples if t[:2] in pairs]
        free = [t for t in triples if t[:2] not in pairs]
        wanted = {("cs", c, s) for c in self.colours for s in self.shapes if (c, s) not in pairs}
        wanted |= {("cm", c, m) for c in self.colours for m in self.motions}
        wanted |= {("sm", s, m) for s in self.shapes for m in self.motions}

        def fill(order, start, k, slack):
            """Greedy: the first k triples of `order` that keep every value within its cap."""
            n = len(start) + k
            caps = [-(-n // len(values)) + slack for values in vocab]
            group = list(start)
            for t in order:
                if len(group) == n:
                    break
                if all(sum(g[i] == t[i] for g in group) < caps[i] for i in range(3)):
                    group.append(t)
            return group if len(group) == n else None

        rng = np.random.default_rng([self.seed, 7])
        for slack in range(3 if self.held_out_triples + self.val_triples <= len(free) else 0):
            for _ in range(500):
                order = [free[i] for i in rng.permutation(len(free))]
                held = fill(order, fixed, self.held_out_triples, slack)
                if held is None:
                    continue
                val = fill([t for t in order if t not in held], [], self.val_triples, slack)
                if val is None:
                    continue
                train = [t for t in free if t not in held and t not in val]
                covered = {(a, t[i], t[j]) for t in train for a, (i, j) in
                           (("cs", (0, 1)), ("cm", (0, 2)), ("sm", (1, 2)))}
                if wanted <= covered:
                    return {"train": train, "eval": sorted(held), "val": sorted(val)}
        v.fail(self, "held_out_triples", f"fewer held-out triples: with held_out_pairs {list(self.held_out_pairs)}, "
               f"{self.held_out_triples} held-out and {self.val_triples} validation triples of {len(triples)} "
               "leave some colour x shape, colour x motion or shape x motion pair out of training")


def caption(colour: str, shape: str, motion: str, variant: int = 0) -> str:
    """A short caption the analyzer parses (data/analyzer.py::parse_caption)."""
    from mugv.torch_backend.data.product_videos import MOTION_PHRASES
    phrase = MOTION_PHRASES[motion][variant % len(MOTION_PHRASES[motion])]
    return f"a {colour} {shape}, {phrase}"


# split -> (tag in the clips' random streams, which compositions, clip count field)
SPLITS = {"train": (0, "train", "count"), "eval_new": (3, "eval", "held_out"),
          "eval_seen": (4, "train", "held_out"), "val_new": (1, "val", "val"), "val_seen": (2, "train", "val")}


def generate(cfg: DemoData, out_dir: str | pathlib.Path, log=print) -> dict[str, pathlib.Path]:
    """Render every split (SPLITS) as mp4 + manifest + attributes; clip i of a split depends only
    on (seed, split, i), and existing clips are kept (a re-run resumes). Training clips draw their
    triple at random from the training compositions; the "_new" splits go round their held-out
    compositions in turn (balanced); the "_seen" splits draw training triples and use a caption
    that occurs in the training manifest. Writes compositions.json (which triple is where).
    Returns the manifests by split."""
    from mugv.torch_backend.data.media import write_mp4
    from mugv.torch_backend.data.product_videos import Scene, render

    out = pathlib.Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    comps = cfg.compositions()
    (out / "compositions.json").write_text(json.dumps({k: [list(t) for t in x] for k, x in comps.items()}, indent=1))
    manifests, trained, train_captions = {}, {}, []
    for split, (tag, which, count_field) in SPLITS.items():
        rows, n = [], getattr(cfg, count_field)
        for i in range(n):
            rng = np.random.default_rng([cfg.seed, tag, i])
            if split.endswith("_seen"):        # a caption of the training manifest, a new clip of it
                text = train_captions[int(rng.integers(len(train_captions)))]
                colour, shape, motion = trained[text]
            else:
                pool = comps[which]
                colour, shape, motion = pool[int(rng.integers(len(pool)))] if split == "train" else pool[i % len(pool)]
            scene = Scene(shape=shape, colour=colour, material="matte",
                          background=cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))], motion=motion)
            render_seed, variant = int(rng.integers(2 ** 31)), int(rng.integers(2))
            if not split.endswith("_seen"):
                text = caption(colour, shape, motion, variant)
            name = f"clips/{split}_{i:05d}.mp4"
            if not (out / name).exists():
                tmp = out / (name + ".part.mp4")
                write_mp4(tmp, render(scene, render_seed, cfg.size, cfg.frames), cfg.fps, lossless=True)
                tmp.rename(out / name)   # atomic: a killed run never leaves half a clip
            rows.append({"id": f"{split}_{i:05d}", "path": name, "fps": cfg.fps, "caption": text,
                         "attributes": {"colour": scene.colour, "shape": scene.shape, "motion": scene.motion}})
        if split == "train":
            trained = {r["caption"]: tuple(r["attributes"].values()) for r in rows}
            train_captions = sorted(trained)
        path = out / f"{split}.jsonl"
        with open(path, "w") as f:   # the manifest (data/manifest.py fields only)
            for row in rows:
                f.write(json.dumps({k: x for k, x in row.items() if k != "attributes"}) + "\n")
        with open(out / f"{split}_attributes.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps({"id": row["id"], **row["attributes"]}) + "\n")
        manifests[split] = path
        log(f"[mugv] data: {n} {split} clips ({cfg.size}x{cfg.size}, {cfg.frames} frames) -> {path}")
    return manifests


def generate_data(cfg) -> int:
    """`mugv generate-data` (cli/commands.py builds (DemoData, out))."""
    data, out = cfg
    generate(data, out)
    return 0


# ---------------------------------------------------------------------------------------------
# The curated training split (`mugv demo --curated`, issue 23)

SOURCE_SIZE = 64          # px: embedded_curate_config's thresholds were measured on 64 px sources
SHOTS_PER_SOURCE = 4
DEFECT_RATE = 0.45        # product_sources' calibrated rate (docs/curation.md)


def curated_shot_frames(cfg: DemoData) -> tuple[int, int]:
    """Shot lengths (frames, drawn per shot) that leave cfg.frames clean frames between two
    transitions: a fade or dissolve takes up to `GRADUAL_FRAMES` (8) of a shot's frames on each side
    (product_sources._join), and a detected gradual span may reach a few frames further (4 on
    each side allowed), so cfg.frames + 2 * 8 + 2 * 4 (41 for 17 frames), up to 8 more."""
    from mugv.torch_backend.data.product_sources import GRADUAL_FRAMES
    lo = cfg.frames + 2 * GRADUAL_FRAMES + 8
    return lo, lo + 8


def curated_sources_spec(cfg: DemoData):
    """Enough sources that the clean shots (the first source's all, then 1 - DEFECT_RATE of each)
    number about cfg.count, the training clips of the uncurated demo; shots move as fast per
    frame as the cfg.frames-frame evaluation clips (with the motion spread over a whole 41-49
    frame shot, the first curated run's DiT learned motions at 17/45 of the evaluation speed:
    t2v motion on new compositions 37 % against 100 %, docs/curation.md)."""
    import math

    from mugv.torch_backend.data.product_sources import SourcesSpec
    rest = max(cfg.count - SHOTS_PER_SOURCE, 0)
    sources = 1 + math.ceil(rest / (SHOTS_PER_SOURCE * (1 - DEFECT_RATE)))
    return SourcesSpec(sources=sources, shots=SHOTS_PER_SOURCE, shot_frames=curated_shot_frames(cfg),
                       size=SOURCE_SIZE, fps=cfg.fps, defect_rate=DEFECT_RATE, seed=cfg.seed,
                       motion_frames=cfg.frames)


def held_out_in_manifest(cfg: DemoData, manifest: str | pathlib.Path) -> list[str]:
    """Captions of `manifest` that name a composition kept out of training (eval or val)."""
    from mugv.torch_backend.data.analyzer import parse_caption
    from mugv.torch_backend.data.manifest import read_manifest
    comps = cfg.compositions()
    kept_out = {tuple(t) for t in comps["eval"] + comps["val"]}
    out = []
    for e in read_manifest(manifest):
        p = parse_caption(e.caption)
        if (p["colour"], p["shape"], p["motion"]) in kept_out:
            out.append(e.caption)
    return out


def curate_train(cfg: DemoData, out_dir: str | pathlib.Path, log=print, spec=None, drop_transitions: bool = False
                 ) -> dict:
    """The demo's training split from curated sources: long multi-shot sources at SOURCE_SIZE px
    (product_sources: cuts, fades, dissolves, planted blur/static/shake/duplicate shots) whose
    scenes are only training compositions with demo captions, curated by `mugv curate` with
    `embedded_curate_config` (clips as `start_s`/`end_s` rows of their source, no re-encode;
    decode's cover resize gives cfg.size) and scored against the generator's truth.
    Writes out_dir/sources and out_dir/curated. Returns {"manifest", "counts", "shots",
    "filters", "kept_rows" (evaluate.rows_spanning_transitions), "report", "spec"}. Raises ValueError naming the manifest if a held-out composition got in.
    spec: a product_sources.SourcesSpec (default curated_sources_spec(cfg)).
    drop_transitions (a diagnostic with the generator's truth, which real data does not have): the
    returned manifest also leaves out the kept clips that hold or touch a true transition
    (`evaluate.transition_in_row`), to measure what missed or misplaced boundaries cost."""
    from mugv.core.curation import embedded_curate_config
    from mugv.torch_backend.data.curation import run
    from mugv.torch_backend.data.curation.evaluate import evaluate_on_truth
    from mugv.torch_backend.data.product_sources import generate_sources
    from mugv.torch_backend.data.product_videos import Scene

    out = pathlib.Path(out_dir)
    spec = spec or curated_sources_spec(cfg)
    train = cfg.compositions()["train"]

    def draw_scene(rng):
        colour, shape, motion = train[int(rng.integers(len(train)))]
        scene = Scene(shape=shape, colour=colour, material="matte",
                      background=cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))], motion=motion)
        return scene, caption(colour, shape, motion, int(rng.integers(2)))

    if not (out / "sources" / "truth.json").is_file():   # written last: a re-run reuses finished sources
        generate_sources(out / "sources", spec, draw_scene)
    report = run(embedded_curate_config(str(out / "sources"), str(out / "curated"), reencode=False))
    scores = evaluate_on_truth(out / "curated", out / "sources" / "truth.json")
    manifest = out / "curated" / "manifest.jsonl"
    leaked = held_out_in_manifest(cfg, manifest)
    if leaked:
        raise ValueError(f"{manifest}: {len(leaked)} rows name held-out compositions, e.g. {leaked[0]!r}")
    counts = {k: report[k] for k in ("sources", "clips", "kept", "rejected_by_filter", "rejected_by_first_reason",
                                     "duplicate_groups", "manifest_rows")}
    if drop_transitions:
        from mugv.torch_backend.data.curation.evaluate import transition_in_row
        truth = json.loads((out / "sources" / "truth.json").read_text())
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        clean = [r for r in rows if transition_in_row(truth, r) is None]
        manifest = out / "curated" / "manifest_without_transitions.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in clean))
        counts["dropped_with_transitions"] = len(rows) - len(clean)
        log(f"[mugv] data: diagnostic: {len(rows) - len(clean)} of {len(rows)} kept clips hold or touch a true "
            f"transition and are left out -> {manifest}")
    log(f"[mugv] data: curated {report['clips']} clips of {report['sources']} {spec.size} px sources, "
        f"{report['kept']} kept -> {manifest}")
    return {"manifest": manifest, "counts": counts, "shots": scores["shots"], "filters": scores["filters"],
            "kept_rows": scores["manifest"], "report": str(out / "curated" / "report.md"),
            "spec": dataclasses.asdict(spec)}
