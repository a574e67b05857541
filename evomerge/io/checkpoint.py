"""Everything in an output checkpoint besides the weights: config, tokenizer, card, recipe.

The output is a plain Hugging Face directory that `AutoModelForCausalLM.from_pretrained`
loads, plus `mergekit_config.yml` so the same merge can be reproduced with mergekit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from evomerge import __version__

# Files that carry the tokenizer and generation defaults (copied from the donor as is).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def write_config(donor_dir: Path, out_dir: Path, *, dtype_name: str, num_hidden_layers: int) -> dict:
    """Copy the donor's config.json with the output dtype and layer count."""
    config = json.loads((Path(donor_dir) / "config.json").read_text())
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            config[key] = num_hidden_layers
            break
    else:
        config["num_hidden_layers"] = num_hidden_layers
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) != num_hidden_layers and len(set(layer_types)) == 1:
        config["layer_types"] = layer_types[:1] * num_hidden_layers
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def copy_tokenizer(donor_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(donor_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(out_dir) / name)
            copied.append(name)
    return copied


def write_recipe(out_dir: Path, recipe_yaml: str) -> Path:
    path = Path(out_dir) / "mergekit_config.yml"
    path.write_text(recipe_yaml)
    return path


def write_model_card(
    out_dir: Path,
    *,
    methods: Sequence[str],
    models: Mapping[str, Path],
    base_model: str | None,
    recipe_yaml: str,
    seed: int,
    scores: Mapping[str, Mapping[str, float]] | None = None,
    provenance: Mapping[str, str] | None = None,
) -> Path:
    """A README.md model card: what was merged, how, and (when known) how it scored."""
    names = [str(ref) for ref in models]
    front = ["---", "base_model:"] + [f"- {name}" for name in names] + [
        "library_name: transformers",
        "tags:",
        "- merge",
        "- evomerge",
        "- mergekit",
        "---",
        "",
    ]
    lines = [
        "# Merged model",
        "",
        f"Made with [evomerge](https://pypi.org/project/evomerge/) {__version__} "
        f"using the {', '.join(f'`{m}`' for m in methods)} merge method{'s' if len(methods) > 1 else ''}.",
        "",
    ]
    if base_model:
        lines += [f"Base model: `{base_model}`.", ""]
    lines += ["## Source models", ""] + [f"- `{ref}` ({path})" for ref, path in models.items()] + [""]
    if scores:
        lines += ["## Scores", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                lines.append(f"| {task} | {metric} | {value:.4f} |")
        lines.append("")
    lines += [
        "## Recipe",
        "",
        "Reproduce with `evomerge merge mergekit_config.yml OUT` or `mergekit-yaml mergekit_config.yml OUT`"
        + (f" (random masks use seed {seed}; mergekit draws its own)." if seed is not None else "."),
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    if provenance:
        lines += ["## Provenance", ""] + [f"- {key}: {value}" for key, value in provenance.items()] + [""]
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(front + lines))
    return path
