"""What a node may know about the world: folders, device, progress. Passed to every node run.

Headless, folders follow ComfyUI's `models/` layout under `--models-dir` (checkpoints/, vae/,
loras/, embeddings/, diffusion_models/ or unet/, text_encoders/ or clip/), plus any
`extra_model_paths.yaml`. Inside ComfyUI the adapter answers through its `folder_paths`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ldm_core.checkpoints import embedded

MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Our folder kinds and the ComfyUI folder names that hold them (first one is the canonical name).
FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "vae": ("vae",),
    "loras": ("loras",),
    "embeddings": ("embeddings",),
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
}


def _builtin_models() -> dict[str, dict[str, Path]]:
    return embedded.builtin_models()


EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"  # example inputs the shipped workflows read


def _builtin_inputs() -> dict[str, Path]:
    return {p.name: p for p in sorted(EXAMPLES_DIR.glob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}


class PathError(ValueError):
    """A file name from a workflow that is missing or would leave its folder."""


def _inside(folder: Path, name: str) -> Path:
    """`folder/name`, refusing names that climb out of the folder ("../x", "/abs").

    The check is on the normalised name, not on where symlinks lead: a model file linked in
    from another disk is the user's choice (ComfyUI allows it too), a `..` in a workflow is not."""
    folder = Path(os.path.abspath(folder))
    path = Path(os.path.normpath(folder / name))
    if os.path.isabs(name) or not path.is_relative_to(folder):
        raise PathError(f"{name!r} points outside {folder}; use a name inside that folder")
    return path


@dataclass
class NodeContext:
    """Folders and device for one run. `model_dirs[kind]` lists the folders searched, in order."""

    model_dirs: dict[str, list[Path]] = field(default_factory=dict)
    input_dir: Path = Path("input")
    output_dir: Path = Path("output")
    temp_dir: Path = Path("temp")
    device: str | None = None
    # kind → name → file shipped with the package (the embedded default model)
    builtin_models: dict[str, dict[str, Path]] = field(default_factory=lambda: _builtin_models())
    # how loaders keep weights in memory: None/"auto" as in the file, or "fp32", "fp16", "bf16"
    weight_dtype: str | None = None
    # name → picture shipped with the pack, found when the input folder has no file of that name
    builtin_inputs: dict[str, Path] = field(default_factory=lambda: _builtin_inputs())

    @classmethod
    def headless(cls, models_dir: str | os.PathLike | None = None, *, input_dir: str | os.PathLike = "input",
                 output_dir: str | os.PathLike = "output", extra_paths: str | os.PathLike | None = None,
                 device: str | None = None, weight_dtype: str | None = None) -> "NodeContext":
        dirs: dict[str, list[Path]] = {k: [] for k in FOLDERS}
        if models_dir is not None:
            for kind, names in FOLDERS.items():
                dirs[kind] += [Path(models_dir) / n for n in names]
        if extra_paths is not None:
            for kind, paths in read_extra_model_paths(extra_paths).items():
                dirs.setdefault(kind, []).extend(paths)
        out = Path(output_dir)
        return cls(dirs, Path(input_dir), out, out / ".temp", device, weight_dtype=weight_dtype)

    def models_searched(self, kind: str) -> str:
        """Where `kind` files are looked for, for messages."""
        folders = [str(Path(os.path.abspath(f))) for f in self.model_dirs.get(kind, [])]
        shipped = " and among the files shipped with the pack" if self.builtin_models.get(kind) else ""
        if not folders:
            return f"no folder for {kind} files was given{shipped}: pass --models-dir (its {kind}/ folder)"
        return f"searched for {kind} files in {', '.join(folders)}{shipped}"

    def inputs_searched(self) -> str:
        """Where input pictures are looked for, for messages."""
        return f"searched for pictures in {Path(os.path.abspath(self.input_dir))} and the pack's examples"

    def list_models(self, kind: str) -> list[str]:
        names = set(self.builtin_models.get(kind, {}))
        for folder in self.model_dirs.get(kind, []):
            if folder.is_dir():
                for p in folder.rglob("*"):
                    if p.suffix.lower() in MODEL_SUFFIXES and p.is_file():
                        names.add(p.relative_to(folder).as_posix())
        return sorted(names)

    def model_path(self, kind: str, name: str) -> Path:
        for folder in self.model_dirs.get(kind, []):
            path = _inside(folder, name)  # raises for names that leave any folder
            if path.is_file():
                return path
        if name in self.builtin_models.get(kind, {}):
            return self.builtin_models[kind][name]
        searched = ", ".join(str(f) for f in self.model_dirs.get(kind, [])) or "no folder (pass --models-dir)"
        raise PathError(f"{kind} file {name!r} not found; searched {searched}")

    def list_inputs(self) -> list[str]:
        names = set(self.builtin_inputs)
        if self.input_dir.is_dir():
            names.update(p.relative_to(self.input_dir).as_posix() for p in self.input_dir.rglob("*")
                         if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return sorted(names)

    def input_path(self, name: str) -> Path:
        path = _inside(self.input_dir, name)
        if path.is_file():
            return path
        if name in self.builtin_inputs:
            return self.builtin_inputs[name]
        raise PathError(f"input image {name!r} not found in {Path(os.path.abspath(self.input_dir))}")

    def output_folder(self, subfolder: str, *, temp: bool = False) -> Path:
        """A folder under the output (or temp) directory; refuses anything that leaves it."""
        base = self.temp_dir if temp else self.output_dir
        folder = _inside(base, subfolder) if subfolder else Path(os.path.abspath(base))
        root = Path(os.path.abspath(self.output_dir))
        if temp and folder.is_relative_to(root) and not folder.resolve().is_relative_to(root.resolve()):
            # the pack's own temp folder inside the output folder must not lead out of it (a symlink)
            raise PathError(f"{folder} leads outside the output folder {root} (a symlink?); remove it")
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def read_extra_model_paths(path: str | os.PathLike) -> dict[str, list[Path]]:
    """ComfyUI's extra_model_paths.yaml: sections of `kind: folder` (or several, one per line),
    relative to the section's `base_path` (itself relative to the YAML file)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:  # missing, unreadable, not text, not YAML
        raise PathError(f"{path}: cannot read it as an extra_model_paths.yaml ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'})") from None
    if not isinstance(data, dict):
        raise PathError(f"{path}: expected sections of folder settings")
    aliases = {name: kind for kind, names in FOLDERS.items() for name in names}
    out: dict[str, list[Path]] = {}
    for section in data.values():
        if not isinstance(section, dict):
            continue
        base = Path(os.path.expanduser(str(section.get("base_path", ""))))
        if not base.is_absolute():
            base = path.parent / base
        for key, value in section.items():
            if key in ("base_path", "is_default") or key not in aliases or value is None:
                continue
            for line in str(value).splitlines():
                if line.strip():
                    out.setdefault(aliases[key], []).append(base / line.strip())
    return out
