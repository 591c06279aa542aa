"""Named quantization recipes: a preset plus tensor rules and embedding/output types, in TOML.

A recipe file::

    description = "what it is for"          # optional
    default = "IQ3_S"                       # optional preset (or type) for tensors no rule names
    token_embedding_type = "Q6_K"           # optional
    output_tensor_type = "Q6_K"             # optional
    [[rules]]                               # first match wins, like --tensor-type
    pattern = "ffn_(gate|up)_exps"          # regex searched in the tensor name
    type = "IQ2_S"

Built-in recipes live in ``pyqmoe/recipe_files/``; every preset P also has a recipe ``P_L``
(``Q4_K_L`` for Q4_K_M, ``Q3_K_XL`` for Q3_K_L): the preset with Q8_0 embedding and output.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import _core

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

RECIPE_DIR = Path(__file__).parent / "recipe_files"
_KEYS = {"description", "default", "token_embedding_type", "output_tensor_type", "rules"}
_FLOAT_PRESETS = {"F16", "BF16", "F32"}


class RecipeError(_core.PyqmoeError):
    """A recipe that does not exist or does not parse."""


@dataclass
class Recipe:
    name: str
    description: str = ""
    default: str | None = None
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None
    rules: list[tuple[str, str]] = field(default_factory=list)
    text: str = ""

    def rule_specs(self) -> list[tuple[str, str]]:
        """(REGEX=TYPE, where it came from) for the Rust rule parser, in priority order."""
        return [(f"{p}={t}", f"recipe {self.name} rules[{i}]") for i, (p, t) in enumerate(self.rules)]


def _preset_names() -> dict[str, str]:
    """Preset and alias names (upper case) -> preset name."""
    presets, aliases = _core.presets()
    names = {p[0]: p[0] for p in presets}
    names.update({a: p for a, p in aliases})
    return names


def _l_variants() -> dict[str, str]:
    """`_L` recipe name -> base preset: Q8_0 embedding/output over any quantized preset."""
    names = _preset_names()
    out = {}
    for alias, preset in sorted(names.items()):
        if preset in _FLOAT_PRESETS:
            continue
        name = f"{alias}_L"
        if name in names:  # Q3_K_L is a preset itself: its _L variant is Q3_K_XL
            continue
        out[name] = preset
    out.pop("Q3_K_L_L", None)
    out["Q3_K_XL"] = "Q3_K_L"
    return out


def builtin_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml")) + sorted(_l_variants())


def parse(text: str, name: str) -> Recipe:
    """Parses and checks recipe TOML; errors name the recipe and the bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {name}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise RecipeError(f"recipe {name}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    types = {t[0] for t in _core.types()}
    presets = _preset_names()

    def check_type(value, where, allow_preset=False):
        if value is None:
            return None
        if not isinstance(value, str):
            raise RecipeError(f"recipe {name}: {where} must be a string, not {value!r}")
        up = value.strip().upper()
        if up in types or (allow_preset and up in presets):
            return up
        kind = "preset or tensor type" if allow_preset else "tensor type"
        raise RecipeError(f"recipe {name}: {where} {value!r} is not a {kind}")

    r = Recipe(name=name, text=text)
    r.description = str(data.get("description", ""))
    r.default = check_type(data.get("default"), "default", allow_preset=True)
    r.token_embedding_type = check_type(data.get("token_embedding_type"), "token_embedding_type")
    r.output_tensor_type = check_type(data.get("output_tensor_type"), "output_tensor_type")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise RecipeError(f"recipe {name}: rules must be an array of tables ([[rules]])")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or set(rule) != {"pattern", "type"}:
            raise RecipeError(f"recipe {name}: rules[{i}] must have exactly the keys pattern and type, got {rule!r}")
        if not isinstance(rule["pattern"], str) or not rule["pattern"]:
            raise RecipeError(f"recipe {name}: rules[{i}].pattern must be a non-empty string")
        r.rules.append((rule["pattern"], check_type(rule["type"], f"rules[{i}].type")))
    return r


def _l_text(name: str, preset: str) -> str:
    return (
        f'description = "{preset} with Q8_0 token embedding and output"\n'
        f'default = "{preset}"\ntoken_embedding_type = "Q8_0"\noutput_tensor_type = "Q8_0"\n'
    )


def load(name_or_path: str) -> Recipe:
    """A built-in recipe by name (case-insensitive) or a TOML file by path."""
    p = Path(name_or_path)
    if p.suffix.lower() == ".toml" or p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise RecipeError(f"recipe {name_or_path}: cannot read: {e.strerror}") from None
        return parse(text, str(p))
    builtin = RECIPE_DIR / f"{name_or_path.lower()}.toml"
    if builtin.is_file():
        return parse(builtin.read_text(encoding="utf-8"), builtin.stem)
    variants = _l_variants()
    up = name_or_path.upper()
    if up in variants:
        return parse(_l_text(up, variants[up]), up)
    raise RecipeError(
        f"no recipe named {name_or_path!r} and no such .toml file (built-in: {', '.join(builtin_names())})"
    )
