"""The `mugv` subcommands: their parsers (jsonargparse over the config dataclasses), the checks
that run before any work, and the dispatch to the job (torch_backend/jobs/) or experiment
(torch_backend/experiments/) each one runs (`RUNNERS`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
from typing import Optional

from mugv.core.validate import ConfigError
from mugv.torch_backend.cli import UsageError

# Help for dataclass fields whose class docstring does not describe them field by field.
FIELD_HELP = {
    # core/dit.py DiTConfig
    "hidden_size": "transformer width", "depth": "number of transformer blocks",
    "num_heads": "attention heads (head_dim = hidden_size / num_heads, divisible by 6)",
    "patch_size": "(t, h, w) latent patch", "in_channels": "latent channels in (the VAE's)",
    "out_channels": "model output channels (2 x in: velocity + unused half, as official)",
    "mlp_ratio": "MLP width / hidden_size", "text_dim": "text-encoder state width",
    "text_max_len": "text tokens per caption", "freq_dim": "timestep sinusoid width",
    "rope_theta": "RoPE base", "rope_space_end": "RoPE spatial frequency end",
    "rope_time_end": "RoPE temporal frequency end", "norm_eps": "LayerNorm/RMSNorm epsilon",
    "init_std": "Megatron init std of linear weights",
    # core/train.py TrainConfig / OptimizerConfig
    "steps": "training steps", "micro_batch": "samples per forward/backward (gradient accumulation "
    "over a global batch)", "grad_accumulation": "gradient accumulation factor",
    "precision": "'bf16' mixed precision (GPU) or 'fp32'", "ema_decay": "EMA decay per step (0 = off)",
    "recompute": "activation recomputation: none | selective | full",
    "recompute_layers": "with recompute=full: layers recomputed (0 = all)", "seed": "random seed",
    "checkpoint_every": "save a checkpoint every N steps", "keep_last": "checkpoints kept",
    "max_nonfinite_in_a_row": "non-finite steps in a row that stop the run",
    "log_every": "log a line every N steps", "lr": "learning rate", "min_lr": "final lr of the cosine schedule",
    "betas": "Adam betas", "eps": "Adam epsilon", "weight_decay": "decoupled weight decay",
    "clip_grad": "gradient-norm clip (0 = off)", "warmup_steps": "linear warm-up steps",
    "schedule": "after warm-up: constant | cosine",
    # core/sampler.py, core/flow.py, core/vae.py
    "num_steps": "Euler sampling steps", "guidance_scale": "classifier-free guidance scale",
    "num_timesteps": "t scale the model sees (t = num_timesteps x sigma)",
    "sample_method": "training sigma draw: logit_normal | uniform", "loc": "logit-normal location",
    "scale": "logit-normal scale", "shift": "resolution/length timestep shift on/off",
    "base_resolution": "shift: reference resolution", "base_frames": "shift: reference frames",
    "shift_scale": "shift: extra factor", "image_weight": "loss weight of text-to-image samples",
    "kl_weight": "KL weight", "disc_start": "step the discriminator starts (null = off)",
    "disc_weight": "adaptive discriminator weight factor", "disc_factor": "discriminator loss factor",
}


def _docstring_help(cls, name: str) -> Optional[str]:
    """'name: text' (or 'name / other: text') from a dataclass docstring."""
    doc = cls.__doc__ or ""
    m = re.search(rf"(?m)^\s*(?:[\w ]+/\s*)*{re.escape(name)}(?:\s*/\s*\w+)*\s*:\s*(.+?)(?=\n\s*\w[\w /,]*:|\n\n|\Z)",
                  doc, re.S)
    return " ".join(m.group(1).split()) if m else None


def _fill_help(parser, cls, prefix: str = "") -> None:
    """Give every option made from `cls`'s fields a help text (docstring, FIELD_HELP or the
    nested class's first docstring line)."""
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            text = (type(default).__doc__ or type(default).__name__).strip().splitlines()[0]
            _set_help(parser, key, text)
            _fill_help(parser, type(default), key + ".")
        else:
            _set_help(parser, key, _docstring_help(cls, f.name) or FIELD_HELP.get(f.name) or f.name.replace("_", " "))


def _set_help(parser, dest: str, text: str) -> None:
    for action in parser._actions:
        if action.dest == dest and not action.help:
            action.help = text


def _parser(description: str, cls=None, **extra):
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
    p = ArgumentParser(description=description, exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="recipe file (YAML/JSON) setting any option below")
    for name, (kind, default, text) in extra.items():
        if kind is bool:   # a flag: --quick (and --no_quick)
            p.add_argument(f"--{name}", action=ActionYesNo, default=default, help=text)
        elif kind is list:  # one or more strings: --prompt "a red cone" "a blue sphere"
            p.add_argument(f"--{name}", type=str, nargs="+", default=default, help=text)
        else:
            p.add_argument(f"--{name}", type=kind, default=default, help=text)
    if cls is not None:
        p.add_class_arguments(cls, None, help=cls.__doc__)
        _fill_help(p, cls)
    return p


def _bare_flags(parser, *names: str):
    """Let the config's bool fields `names` stand alone on the command line: `--curated` means
    `--curated true` (an explicit `--curated false` still parses)."""
    for action in parser._actions:
        if action.dest in names:
            action.nargs, action.const = "?", True
    return parser


def build_parser():
    """The top-level parser with one subparser per subcommand."""
    from jsonargparse import ArgumentParser

    from mugv.core.curation import CurateConfig
    from mugv.core.dit import DiTConfig
    from mugv.core.recipe import PretrainConfig
    from mugv.core.sampler import FlowSamplerConfig
    from mugv.torch_backend.experiments import demo
    from mugv.torch_backend.jobs.finetune import FinetuneRunConfig
    from mugv.torch_backend.jobs.generate_data import DemoData
    from mugv.torch_backend.jobs.vae_train import VAETrainConfig

    top = ArgumentParser(prog="mugv", description="mugv: train and sample MUG-V video models",
                         exit_on_error=False)
    sub = top.add_subcommands(dest="command", required=True)
    subs = {
        "generate-data": _parser("Render the embedded product-video dataset (mp4 + manifests)", DemoData,
                                 out=(str, "runs/data", "output folder")),
        "train-vae": _parser("Train the video VAE on a folder or manifest of videos", VAETrainConfig),
        "eval-vae": _parser("VAE reconstruction PSNR/SSIM over clips, with side-by-side PNG/mp4", None,
                            data=(str, None, "folder of videos or a .jsonl/.csv manifest (required)"),
                            size=(str, "tiny", "VAE size (core/vae.py VAE_SIZES)"),
                            checkpoint=(Optional[str], None, "mugv VAE checkpoint (step_* directory)"),
                            official=(Optional[str], None, "official vae.pt / .safetensors instead"),
                            height=(int, 32, "frame height"), width=(int, 32, "frame width"),
                            frames=(int, 17, "frames per clip"), fps=(float, 16.0, "sampling frame rate"),
                            out=(Optional[str], None, "folder for metrics and side-by-side media")),
        "cache": _parser("Encode a recipe's latents and text into the tensorstore cache",
                         PretrainConfig,
                         stage=(Optional[str], None, "only this stage's bucket (default: every stage)")),
        "train": _parser("Pre-train MUG-DiT: a whole curriculum recipe or one of its stages",
                         PretrainConfig,
                         stage=(Optional[str], None, "train only this stage (it starts from the previous "
                                                     "stage's checkpoint)")),
        "sample": _sample_parser(DiTConfig, FlowSamplerConfig),
        "evaluate": _parser("Caption-following accuracy of videos by the analyzer (colour, shape, motion)", None,
                            manifest=(str, None, "manifest of the videos to score with their captions (required)")),
        "convert-official": _parser("Import official MUG-V weights (dit.pt / vae.pt) as mugv checkpoints", None,
                                    kind=(str, "dit", "dit | vae"),
                                    src=(str, None, "official file (.pt / .safetensors) (required)"),
                                    dst=(str, None, "checkpoint root directory to write (required)"),
                                    size=(Optional[str], None, "VAE: size name (default: read from the weights)")),
        "demo": _bare_flags(_parser("The end-to-end demo: data -> VAE -> cache -> curriculum -> samples -> report",
                                    demo.DemoConfig, quick=(bool, False, "the short CI variant (about 3 minutes)")),
                            "curated"),
        **_preference_parsers(),
        "finetune": _parser("Fine-tune MUG-DiT (LoRA or full) on a manifest of clips, from official weights or "
                            "a mugv checkpoint", FinetuneRunConfig),
        "curate": _parser("Curate a folder of raw videos into a training manifest: shots, quality filters, "
                          "dedup, captions, balance weights, report (docs/curation.md)", CurateConfig),
        "verify-kernels": _parser("Run the GPU parity tests of the Triton kernels and FlashAttention-4 here and "
                                  "record which may run on this device", None,
                                  only=(Optional[str], None, "comma-separated kernel names (default: all)"),
                                  record=(Optional[str], None, "record file (default: the user cache, "
                                                               "kernels/verify.py user_record_path)"),
                                  log_dir=(Optional[str], None, "folder for the pytest log and junit XML")),
    }
    for name, p in subs.items():
        sub.add_subcommand(name, p, help=p.description)
    return top


def _preference_parsers() -> dict:
    """`make-preferences` and `train-preference` (docs/preference.md)."""
    from mugv.torch_backend.jobs import preference, preference_data
    return {"make-preferences": _parser("Sample K candidates per prompt, score them with the analyzer, write DPO "
                                        "pairs and KTO labels", preference_data.PreferenceDataConfig),
            "train-preference": _parser("Preference stage: Diffusion-DPO or Diffusion-KTO against a frozen "
                                        "reference checkpoint", preference.PreferenceRunConfig)}


def _sample_parser(DiTConfig, FlowSamplerConfig):
    from mugv.core.recipe import demo_dit
    p = _parser("Sample videos from a checkpoint: text-to-video, or image-to-video from a product image", None,
                checkpoint=(Optional[str], None, "trainer run folder or step_* checkpoint"),
                official=(Optional[str], None, "official-layout DiT weights: a file or a local directory"),
                group=(str, "model", "checkpoint group: model | ema"),
                vae_checkpoint=(Optional[str], None, "mugv VAE checkpoint"),
                vae_official=(Optional[str], None, "official-layout VAE weights file instead"),
                vae_random=(bool, False, "decode through a randomly initialised VAE (smoke tests only: the "
                                         "videos are noise); without it a VAE checkpoint is required"),
                vae_size=(str, "tiny", "VAE size (core/vae.py VAE_SIZES; 'official' reads widths from "
                                       "--vae_official weights, norm groups 32)"),
                prompt=(list, [], "captions, one clip each: --prompt \"a red cone\" \"a blue sphere\""),
                image=(Optional[str], None, "product image / video whose first frame starts every clip (i2v)"),
                frames=(int, 17, "frames per clip"), size=(int, 32, "height = width in pixels"),
                fps=(float, 16.0, "frame rate"), seed=(int, 0, "noise seed"),
                text_encoder=(str, "embedded", "'embedded' or a local T5 directory"),
                out=(str, "runs/samples", "output folder (mp4 + PNG grid)"))
    p.add_class_arguments(DiTConfig, "dit", help="DiT architecture (for mugv checkpoints)")
    _fill_help(p, DiTConfig, "dit.")
    p.add_class_arguments(FlowSamplerConfig, "sampler", help="sampler")
    _fill_help(p, FlowSamplerConfig, "sampler.")
    p.set_defaults(dit=dataclasses.asdict(demo_dit()))
    return p


def _check_recipe_files(argv: list[str]) -> None:
    """A recipe file given twice the same key kept the last one in silence (issue 26): refuse it,
    naming the file, the key and both lines. YAML (JSON is YAML) through a safe loader."""
    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise UsageError(f"{path}:{key_node.start_mark.line + 1}: key {key!r} given twice (first on line "
                                 f"{seen[key]}); a recipe names each key once")
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path is None:
            continue
        try:
            text = open(path, encoding="utf-8-sig").read()
        except OSError as err:
            raise UsageError(f"--config {path}: {err.strerror}") from None
        try:
            yaml.load(text, Loader=Strict)
        except yaml.YAMLError as err:
            raise UsageError(f"--config {path}: not valid YAML/JSON ({err})") from None


def parse(argv: list[str]):
    """(subcommand, its config namespace with dataclasses built). Every input error -> UsageError."""
    _check_recipe_files(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        command = ns.command
        cfg = parser.instantiate(ns)[command] if hasattr(parser, "instantiate") else \
            parser.instantiate_classes(ns)[command]
    except argparse.ArgumentError as err:
        raise UsageError(str(err)) from None
    except ConfigError as err:
        raise UsageError(f"out-of-range value: {err}") from None
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    try:
        return command, _build(command, cfg)
    except ConfigError as err:
        raise UsageError(f"out-of-range value: {err}") from None
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None


def _fields(cls, ns) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def _build(command: str, ns):
    """Build the config dataclass and check paths before any work."""
    from mugv.core.recipe import PretrainConfig
    from mugv.torch_backend.experiments import demo
    from mugv.torch_backend.jobs.generate_data import DemoData
    from mugv.torch_backend.jobs.loaders import require_path
    from mugv.torch_backend.jobs.vae_train import VAETrainConfig

    if command == "generate-data":
        return DemoData(**_fields(DemoData, ns)), ns.out
    if command == "train-vae":
        cfg = VAETrainConfig(**_fields(VAETrainConfig, ns))
        require_path("data", cfg.data, "folder or manifest")
        return cfg
    if command == "eval-vae":
        require_path("data", ns.data or "", "folder or manifest")
        if ns.checkpoint:
            require_path("checkpoint", ns.checkpoint, "checkpoint")
        return ns
    if command in ("cache", "train"):
        cfg = PretrainConfig(**_fields(PretrainConfig, ns))
        require_path("manifest", cfg.manifest, "manifest file")
        require_path("vae_checkpoint", cfg.vae_checkpoint, "VAE checkpoint")
        if ns.stage is not None and ns.stage not in [s.name for s in cfg.stages]:
            raise ConfigError(f"--stage {ns.stage!r}: expected one of {[s.name for s in cfg.stages]}")
        return cfg, ns.stage
    if command == "sample":
        if bool(ns.checkpoint) == bool(ns.official):
            raise ConfigError("sample: give exactly one of --checkpoint (mugv) or --official (official layout)")
        for key in ("checkpoint", "official", "vae_checkpoint", "vae_official", "image"):
            if getattr(ns, key):
                require_path(key, getattr(ns, key))
        if not ns.prompt:
            raise ConfigError("sample: --prompt expected at least one caption")
        if not (ns.vae_checkpoint or ns.vae_official or ns.vae_random):
            raise ConfigError("sample: give --vae_checkpoint (mugv) or --vae_official to decode the samples "
                              "(--vae_random decodes through an untrained VAE: noise, for smoke tests only)")
        if ns.vae_random and (ns.vae_checkpoint or ns.vae_official):
            raise ConfigError("sample: --vae_random together with a VAE checkpoint: give one")
        return ns
    if command == "evaluate":
        require_path("manifest", ns.manifest or "", "manifest file")
        return ns
    if command == "convert-official":
        if ns.kind not in ("dit", "vae"):
            raise ConfigError(f"--kind {ns.kind!r}: expected 'dit' or 'vae'")
        require_path("src", ns.src or "", "official weights file")
        if not ns.dst:
            raise ConfigError("--dst: expected a checkpoint root directory")
        return ns
    if command == "make-preferences":
        from mugv.torch_backend.jobs.preference_data import PreferenceDataConfig
        cfg = PreferenceDataConfig(**_fields(PreferenceDataConfig, ns))
        for key, what in (("checkpoint", "DiT checkpoint"), ("vae_checkpoint", "VAE checkpoint"), ("prompts", "manifest")):
            require_path(key, getattr(cfg, key), what)
        return cfg
    if command == "train-preference":
        from mugv.torch_backend.jobs.preference import PreferenceRunConfig, resolve_reference
        cfg = PreferenceRunConfig(**_fields(PreferenceRunConfig, ns))
        require_path("manifest", cfg.manifest, "preference manifest")
        resolve_reference(cfg.reference)
        return cfg
    if command == "finetune":
        from mugv.torch_backend.jobs.finetune import FinetuneRunConfig
        cfg = FinetuneRunConfig(**_fields(FinetuneRunConfig, ns))
        require_path("base", cfg.base, "official weights file or checkpoint")
        require_path("manifest", cfg.manifest, "manifest file")
        for key in ("vae_official", "vae_checkpoint"):
            if getattr(cfg, key):
                require_path(key, getattr(cfg, key))
        return cfg
    if command == "curate":
        from mugv.core.curation import CurateConfig
        cfg = CurateConfig(**_fields(CurateConfig, ns))
        require_path("input_dir", cfg.input_dir, "folder of videos")
        if not cfg.out_dir:
            raise ConfigError("curate: --out_dir expected an output folder")
        return cfg
    if command == "verify-kernels":
        return ns
    if command == "demo":
        cfg = demo.DemoConfig(**_fields(demo.DemoConfig, ns))
        if ns.quick:
            cfg = dataclasses.replace(demo.quick_config(), out=cfg.out if cfg.out != "runs/demo" else "runs/demo_quick",
                                      preference=cfg.preference, preference_seeds=cfg.preference_seeds,
                                      seeds=cfg.seeds, score=cfg.score, curated=cfg.curated)
        return cfg
    raise UsageError(f"unknown subcommand {command!r}")


def preflight(command: str, cfg) -> None:
    """Every input a subcommand reads checked before any model loads (jobs/preflight.py): its
    manifests (each row parsed and typed), checkpoints (manifest and checksum), weights files,
    text encoder folder, pixel sizes, parallel layout against the model and the world size, and
    precision against the device. A failure is `InputError`: one line, exit status 2."""
    from mugv.torch_backend.jobs import preflight as check

    def common(text_spec, dit=None, parallel=None, train=None):
        check.text_encoder("text_encoder", text_spec)
        if parallel is not None and dit is not None:
            check.layout("parallel", parallel, dit)
        if train is not None:
            check.precision("train.precision", train.precision)

    if command in ("cache", "train"):
        recipe, _ = cfg
        check.manifest("manifest", recipe.manifest)
        check.checkpoint("vae_checkpoint", recipe.vae_checkpoint, step_only=True, holds="vae")
        common(recipe.text_encoder, *((recipe.dit, recipe.parallel, recipe.train) if command == "train" else ()))
    elif command == "sample":
        if cfg.checkpoint:
            check.checkpoint("checkpoint", cfg.checkpoint, holds="dit")
        if cfg.official and pathlib.Path(cfg.official).is_dir():
            from mugv.torch_backend.jobs.loaders import official_dit_file
            official_dit_file(cfg.official)
        if cfg.vae_checkpoint:
            check.checkpoint("vae_checkpoint", cfg.vae_checkpoint, step_only=True, holds="vae")
        check.pixels("size", cfg.size, 8 * cfg.dit.patch_size[1])
        check.positive("frames", cfg.frames)
        check.positive("fps", cfg.fps)
        common(cfg.text_encoder)
    elif command == "eval-vae":
        from mugv.core.vae import VAE_SIZES
        check.data("data", cfg.data)
        if cfg.checkpoint:
            check.checkpoint("checkpoint", cfg.checkpoint, step_only=True, holds="vae")
        if cfg.official:
            check.weights_file("official", cfg.official)
        if cfg.size not in VAE_SIZES and not (cfg.official and cfg.size == "official"):
            raise check.InputError(f"--size = {cfg.size!r}: expected a VAE size, one of {sorted(VAE_SIZES)}")
        for key in ("height", "width"):
            check.pixels(key, getattr(cfg, key), 8)
        check.positive("frames", cfg.frames)
        check.positive("fps", cfg.fps)
    elif command == "train-vae":
        check.data("data", cfg.data)
    elif command == "evaluate":
        check.manifest("manifest", cfg.manifest)
    elif command == "finetune":
        check.manifest("manifest", cfg.manifest)
        if cfg.vae_checkpoint:
            check.checkpoint("vae_checkpoint", cfg.vae_checkpoint, step_only=True, holds="vae")
        dit = None
        if pathlib.Path(cfg.base).is_dir():   # an official file's config comes from its weights (loaded later)
            from mugv.core import validate
            from mugv.core.dit import DiTConfig
            step = check.checkpoint("base", cfg.base, holds="dit")
            dit = validate.from_dict(DiTConfig, json.loads((step / "manifest.json").read_text())["config"]["dit"])
        common(cfg.text_encoder, dit, cfg.parallel, cfg.train)
    elif command == "train-preference":
        rows = check.manifest("manifest", cfg.manifest, kind=cfg.objective)
        check.checkpoint("reference", cfg.reference, holds="dit")
        if not rows[0].is_latent:
            check.checkpoint("vae_checkpoint", cfg.vae_checkpoint, step_only=True, holds="vae")
        check.precision("reference_precision", cfg.reference_precision)
        common(cfg.text_encoder, cfg.dit, cfg.parallel, cfg.train)
    elif command == "make-preferences":
        check.manifest("prompts", cfg.prompts)
        check.checkpoint("checkpoint", cfg.checkpoint, holds="dit")
        check.checkpoint("vae_checkpoint", cfg.vae_checkpoint, step_only=True, holds="vae")
        check.pixels("size", cfg.size, 8 * cfg.dit.patch_size[1])
        common(cfg.text_encoder)


# subcommand -> (module, function) that runs it: a job, or the demo experiment on top of them
RUNNERS = {
    "generate-data": ("jobs.generate_data", "generate_data"),
    "train-vae": ("jobs.vae_train", "train_vae"),
    "eval-vae": ("jobs.vae_eval", "eval_vae"),
    "cache": ("jobs.pretrain", "cache"),
    "train": ("jobs.pretrain", "train"),
    "sample": ("jobs.sample", "sample"),
    "evaluate": ("jobs.evaluate", "evaluate"),
    "convert-official": ("jobs.convert_official", "convert_official"),
    "make-preferences": ("jobs.preference_data", "make_preferences_command"),
    "train-preference": ("jobs.preference", "train_preference_command"),
    "finetune": ("jobs.finetune", "finetune_command"),
    "curate": ("jobs.curate", "curate"),
    "verify-kernels": ("jobs.verify_kernels", "verify_kernels"),
    "demo": ("experiments.demo", "demo"),
}


def run(command: str, cfg) -> int:
    """Run the subcommand's job (or experiment) on its built config; returns the exit status."""
    import importlib
    module, function = RUNNERS[command]
    return getattr(importlib.import_module(f"mugv.torch_backend.{module}"), function)(cfg)
