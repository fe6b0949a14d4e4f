"""Diagnosis of a config that contradicts the weights: which fields, and what the weights say.

Canonical shapes computed from a labelled config (:func:`clawconvert.hfconfig.labelled`) carry,
size by size, the config field each size *is* (``vision_config.hidden_size``).
:func:`contradicted_fields` lets every tensor vote for the size its weights give each field;
:func:`diagnose_shapes` turns the winners into the first line of the planner's error, and
:func:`config_diagnosis` spells them in the source format's own config fields (an OpenCLIP
``vision_cfg.width``, not transformers' ``hidden_size`` and ``intermediate_size``).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

Shape = tuple[int, ...]


def contradicted_fields(shapes: Iterable[tuple[str, Shape, Shape]]) -> dict[str, tuple[int, int, list[str]]]:
    """The config fields the weights disagree with: ``{field: (configured, inferred, tensors)}``.

    ``shapes`` are ``(tensor, shape in the weights, shape the config expects)`` for every tensor
    checked.  The expected shapes come from a labelled config (:func:`clawconvert.hfconfig.labelled`):
    a size that *is* a config field names it.  Every tensor votes, for each such size, for the
    size its weights give that field; a field is contradicted when more tensors give another
    size than the configured one (a lone odd tensor is that tensor's problem, not the config's).
    ``tensors`` are those whose weights give the inferred size where the config says otherwise."""
    votes: dict[str, dict[int, list[str]]] = {}
    configured: dict[str, int] = {}
    for name, shape, expected in shapes:
        if len(shape) != len(expected):
            continue
        for got, want in zip(shape, expected):
            field_name = getattr(want, "field", None)
            if field_name is not None:
                tensors = votes.setdefault(field_name, {}).setdefault(int(got), [])
                if name not in tensors:
                    tensors.append(name)
                configured[field_name] = int(want)
    out = {}
    for field_name, by_size in votes.items():
        agree = len(by_size.get(configured[field_name], []))
        size, tensors = max(by_size.items(), key=lambda kv: len(kv[1]))
        if size != configured[field_name] and len(tensors) > agree:
            out[field_name] = (configured[field_name], size, tensors)
    return out


# a diagnosis: the corrections in the canonical config's fields -> (field as the user's config
# spells it, configured value, value the weights give, tensors) for the first line
Explain = Callable[[dict[str, tuple[int, int, list[str]]]], list[tuple[str, object, object, list[str]]]]


def _canonical_names(fields: dict[str, tuple[int, int, list[str]]]) -> list[tuple[str, object, object, list[str]]]:
    return [(f, cfg, got, tensors) for f, (cfg, got, tensors) in fields.items()]


def diagnose_shapes(checked: list[tuple[str, Shape, Shape]], contradictions: list[tuple[str, Shape, Shape, str]],
                    explain: Explain | None) -> tuple[str | None, list[str], list[str]]:
    """(the diagnosis naming the config fields the weights contradict, or None; the messages of
    the contradictions it explains; the messages of those it does not)."""
    fields = contradicted_fields(checked)

    def explained(shape: Shape, expected: Shape) -> bool:
        return len(shape) == len(expected) and all(
            got == want or (getattr(want, "field", None) in fields and got == fields[want.field][1])
            for got, want in zip(shape, expected))

    rest = [c for c in contradictions if not fields or not explained(c[1], c[2])]
    if len(rest) == len(contradictions):
        return None, [], [c[3] for c in rest]
    named = (explain or _canonical_names)(fields) or _canonical_names(fields)
    message = "; ".join(f"{f} is {cfg} but the weights say {got} ({len(t)} tensor{'s' if len(t) != 1 else ''})"
                        for f, cfg, got, t in named)
    return message, [c[3] for c in contradictions if c not in rest], [c[3] for c in rest]


def _field(config: Any, name: str) -> Any:
    for part in name.split("."):
        config = getattr(config, part)
    return config


def config_diagnosis(fmt: Any, family: Any, config: Any) -> Explain:
    """An ``explain`` hook for :func:`clawconvert.engine.plan_conversion`: the corrections inferred
    in the canonical config's fields, spelled in the fields of ``fmt``'s own config.

    The config is corrected and written in ``fmt``'s form; of the fields that change, the ones
    named are those the weights need changed: a change that can be undone with the corrected
    config read back unchanged is undone (OpenCLIP: a wrong ``vision_cfg.width`` shows in
    transformers' terms as ``hidden_size`` and ``intermediate_size``, and keeps its
    ``head_width``).  Each named field counts the tensors of the corrections it carries.
    Returns [] when the format cannot spell the corrections."""
    def explain(fields: dict[str, tuple[int, int, list[str]]]) -> list[tuple[str, Any, Any, list[str]]]:
        fixed = copy.deepcopy(config)
        for name, (_, size, _) in fields.items():
            *path, leaf = name.split(".")
            setattr(_field(fixed, ".".join(path)) if path else fixed, leaf, size)
        try:
            before, after = fmt.config_fields(family, config), fmt.config_fields(family, fixed)
        except Exception:  # a correction the format cannot represent: the canonical names then
            return []

        def still_wrong(flat: dict[str, Any]) -> list[str]:
            try:
                back = fmt.config_from_fields(family, flat)
                return [f for f, (_, size, _) in fields.items() if _field(back, f) != size]
            except Exception:
                return list(fields)

        named = []
        for key in [k for k in after if after[k] != before.get(k)]:
            undone = {**after, key: before.get(key)}
            wrong = still_wrong(undone)
            if wrong:
                named.append((key, before.get(key), after[key],
                              list(dict.fromkeys(t for f in wrong for t in fields[f][2]))))
            else:
                after = undone   # the weights do not need this one changed
        return named
    return explain
