"""Targets, the table of medians and ratios, and the plots, all from the results JSON.

    .venv/bin/python bench/report.py bench/results/latest.json   # re-print / re-plot

The targets are the issue's (issue 5), evaluated on medians of the same run:

* T1 flat:   clawconvert's peak RSS at the largest scenario-1 checkpoint <= 1.3x that at
             the smallest;
* T2 small:  clawconvert's peak RSS <= 15% of the checkpoint's size, ViT-L/14 and larger;
* T3 floor:  clawconvert's wall time <= 1.5x ``cp`` of the same bytes, scenarios 1 and 2,
             ViT-L/14 size and larger;
* T4 peers:  against each peer path, >= 3x faster and >= 5x lower peak RSS, ViT-L/14 and
             larger and the merge.  A peer that did not finish (OOM) counts as beaten on
             memory (its figure is a lower bound) and on time only when clawconvert's
             time is under a third of the time the peer had spent when it died.

and issue 18's, on the same run:

* T5 floors: ViT-L/14 OpenCLIP -> HF within 1.2x ``cp`` + fsync and within 2x plain ``cp``;
* T6 merge:  merge-lora >= 10x faster and >= 20x lower peak RSS than PEFT;
* T7 start-up: ``clawconvert inspect`` of the fixture <= 3x ``python -c "import numpy"``
             (medians of alternating runs).

and issue 14's:

* T8 VLM merge: merge-lora into a Qwen2.5-VL-shaped checkpoint of >= 3B parameters (bf16) >= 10x
             faster and >= 20x lower peak RSS than PEFT ``merge_and_unload``.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

T_FLAT, T_RSS_FRACTION, T_WALL_CP, T_PEER_TIME, T_PEER_RSS = 1.3, 0.15, 1.5, 3.0, 5.0
# issue 18
T18_CP_FSYNC, T18_CP, T18_MERGE_TIME, T18_MERGE_RSS, T18_STARTUP = 1.2, 2.0, 10.0, 20.0, 3.0
STARTUP_BASE, STARTUP_CMD = "python -c 'import numpy'", "clawconvert inspect fixtures/openclip_tiny"


def gib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB" if n >= 2**30 * 0.995 else f"{n / 2**20:.0f} MiB"


def gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s" if x < 100 else f"{x:.0f} s"


def _role(size: dict, role: str) -> list[tuple[str, dict]]:
    return [(n, t) for n, t in size["tools"].items() if t["role"] == role]


def _ok(slot: dict | None) -> bool:
    return bool(slot) and "median_wall_s" in slot


def _claw(size: dict) -> dict | None:
    found = _role(size, "clawconvert")
    return found[0][1] if found else None


def _cp(size: dict) -> dict | None:
    """``cp`` + fsync: the floor."""
    found = _role(size, "floor")
    return found[0][1] if found else None


def _cp_plain(size: dict) -> dict | None:
    """Plain ``cp`` (page cache only)."""
    found = _role(size, "reference")
    return found[0][1] if found else None


def _issue18_targets(data: dict, add) -> None:
    for scen in data.get("scenarios", []):
        for s in scen["sizes"]:
            claw = _claw(s)
            if not _ok(claw):
                continue
            cw, label = claw["median_wall_s"], f"{s['size']} ({gb(s['checkpoint_bytes'])})"
            if scen["key"] == "openclip-hf" and s["size"] == "L14":
                for floor, limit, what in ((_cp(s), T18_CP_FSYNC, "cp + fsync"), (_cp_plain(s), T18_CP, "plain cp")):
                    if _ok(floor):
                        ratio = cw / floor["median_wall_s"]
                        add(f"T5 ViT-L/14 wall time <= {limit}x {what}", scen, s["size"], round(ratio, 3), limit,
                            ratio <= limit, f"{label}: {secs(cw)} vs {what} {secs(floor['median_wall_s'])} = "
                            f"{ratio:.2f}x (target <= {limit}x)", True)
            label_of = {"merge-lora": "T6 merge-lora", "merge-lora-vlm": "T8 VLM merge-lora"}
            if scen["key"] in label_of:
                for name, peer in _role(s, "peer"):
                    if not _ok(peer):
                        continue
                    tr, rr = peer["median_wall_s"] / cw, peer["median_peak_rss_bytes"] / claw["median_peak_rss_bytes"]
                    in_scope = s["size"] in set(scen.get("large_sizes", []))
                    add(f"{label_of[scen['key']]} >= {T18_MERGE_TIME:.0f}x faster than PEFT", scen, s["size"], round(tr, 3),
                        T18_MERGE_TIME, tr >= T18_MERGE_TIME, f"{label}: {secs(peer['median_wall_s'])} / {secs(cw)} "
                        f"= {tr:.2f}x faster (target >= {T18_MERGE_TIME:.0f}x)", in_scope)
                    add(f"{label_of[scen['key']]} >= {T18_MERGE_RSS:.0f}x lower peak RSS than PEFT", scen, s["size"],
                        round(rr, 3), T18_MERGE_RSS, rr >= T18_MERGE_RSS,
                        f"{label}: {gib(peer['median_peak_rss_bytes'])} / {gib(claw['median_peak_rss_bytes'])} = "
                        f"{rr:.2f}x lower (target >= {T18_MERGE_RSS:.0f}x)", in_scope)
    startup = data.get("startup") or {}
    base, cmd = startup.get(STARTUP_BASE), startup.get(STARTUP_CMD)
    if _ok(base) and _ok(cmd):
        ratio = cmd["median_wall_s"] / base["median_wall_s"]
        add(f"T7 start-up <= {T18_STARTUP:.0f}x import numpy", {"key": "start-up"}, "fixture", round(ratio, 3),
            T18_STARTUP, ratio <= T18_STARTUP, f"{STARTUP_CMD}: {cmd['median_wall_s']:.3f} s vs {STARTUP_BASE} "
            f"{base['median_wall_s']:.3f} s = {ratio:.2f}x (target <= {T18_STARTUP:.0f}x)", True)


def evaluate_targets(data: dict) -> list[dict]:
    out: list[dict] = []

    def add(target, scen, size, value, limit, met, text, in_scope):
        out.append({"target": target, "scenario": scen["key"], "size": size, "value": value, "limit": limit,
                    "met": met, "in_scope": in_scope, "text": text})

    for scen in data.get("scenarios", []):
        sizes = scen["sizes"]
        large = set(scen.get("large_sizes", []))
        key = scen["key"]
        # T1 flatness (scenario 1)
        if key == "openclip-hf":
            pts = [(s["checkpoint_bytes"], s) for s in sizes if _ok(_claw(s))]
            if len(pts) >= 2:
                (b0, s0), (b1, s1) = min(pts, key=lambda p: p[0]), max(pts, key=lambda p: p[0])
                r0, r1 = _claw(s0)["median_peak_rss_bytes"], _claw(s1)["median_peak_rss_bytes"]
                ratio = r1 / r0
                add("T1 clawconvert peak RSS flat in checkpoint size", scen, f"{s0['size']}..{s1['size']}",
                    round(ratio, 3), T_FLAT, ratio <= T_FLAT,
                    f"{gib(r0)} at {s0['size']} ({gb(b0)}) -> {gib(r1)} at {s1['size']} ({gb(b1)}): "
                    f"{ratio:.2f}x (target <= {T_FLAT}x)", not any(s["size"].startswith("tiny") for _, s in pts))
        for s in sizes:
            claw, cp = _claw(s), _cp(s)
            in_scope = s["size"] in large
            ck = s["checkpoint_bytes"]
            label = f"{s['size']} ({gb(ck)})"
            if claw is None:
                continue
            if not _ok(claw):
                if in_scope:
                    add("clawconvert ran", scen, s["size"], None, None,
                        None if claw.get("status", "").startswith("skipped") else False,
                        f"clawconvert {claw.get('status')}", in_scope)
                continue
            cr, cw = claw["median_peak_rss_bytes"], claw["median_wall_s"]
            if key == "openclip-hf":
                frac = cr / ck
                add("T2 clawconvert peak RSS <= 15% of the checkpoint", scen, s["size"], round(frac, 4),
                    T_RSS_FRACTION, frac <= T_RSS_FRACTION,
                    f"{label}: {gib(cr)} = {frac:.0%} of the checkpoint (target <= 15%, i.e. <= {gib(int(ck * .15))})",
                    in_scope)
            if key.startswith(("openclip-hf", "bigvision")) and _ok(cp):
                ratio = cw / cp["median_wall_s"]
                add("T3 clawconvert wall time <= 1.5x cp", scen, s["size"], round(ratio, 3), T_WALL_CP,
                    ratio <= T_WALL_CP, f"{label}: {secs(cw)} vs cp {secs(cp['median_wall_s'])} = {ratio:.2f}x "
                    f"(target <= {T_WALL_CP}x)", in_scope)
            for name, peer in _role(s, "peer"):
                short = name.replace("peer: ", "")
                if _ok(peer):
                    tr, rr = peer["median_wall_s"] / cw, peer["median_peak_rss_bytes"] / cr
                    add("T4 >= 3x faster than the peer", scen, s["size"], round(tr, 3), T_PEER_TIME, tr >= T_PEER_TIME,
                        f"{label} vs {short}: {secs(peer['median_wall_s'])} / {secs(cw)} = {tr:.2f}x faster "
                        f"(target >= {T_PEER_TIME:.0f}x)", in_scope)
                    add("T4 >= 5x lower peak RSS than the peer", scen, s["size"], round(rr, 3), T_PEER_RSS,
                        rr >= T_PEER_RSS, f"{label} vs {short}: {gib(peer['median_peak_rss_bytes'])} / {gib(cr)} = "
                        f"{rr:.2f}x lower (target >= {T_PEER_RSS:.0f}x)", in_scope)
                elif str(peer.get("status", "")).startswith(("failed (OOM", "skipped: failed (OOM")):
                    died = peer.get("peak_rss_at_failure_bytes")
                    rr = died / cr if died else None
                    add("T4 >= 5x lower peak RSS than the peer", scen, s["size"], round(rr, 3) if rr else None,
                        T_PEER_RSS, True, f"{label} vs {short}: the peer did not finish ({peer['status']}"
                        + (f", {gib(died)} when it died" if died else "") + f"); clawconvert finished in {gib(cr)}",
                        in_scope)
                    wall = peer.get("wall_at_failure_s")
                    tr = wall / cw if wall else None
                    add("T4 >= 3x faster than the peer", scen, s["size"], round(tr, 3) if tr else None, T_PEER_TIME,
                        True if tr and tr >= T_PEER_TIME else None,
                        f"{label} vs {short}: the peer did not finish"
                        + (f" (it died after {secs(wall)}; clawconvert took {secs(cw)})" if wall else ""), in_scope)
                elif peer.get("status"):
                    add("T4 peer comparison", scen, s["size"], None, None, None,
                        f"{label} vs {short}: undetermined, the peer {peer['status']}", in_scope)
    _issue18_targets(data, add)
    return out


def _size(data: dict, scen_key: str, size: str) -> dict | None:
    for scen in data.get("scenarios", []):
        if scen["key"] == scen_key:
            return next((s for s in scen["sizes"] if s["size"] == size), None)
    return None


def _cpu(slot: dict) -> float | None:
    """Median user + sys CPU seconds of a tool's successful runs."""
    xs = [r["user_s"] + r["sys_s"] for r in slot.get("runs", []) if r.get("status") == "ok"
          and r.get("user_s") is not None and r.get("sys_s") is not None]
    return statistics.median(xs) if xs else None


def explain(t: dict, data: dict) -> str | None:
    """Why a missed time target was missed, from the floors measured in the same run."""
    s = _size(data, t["scenario"], t["size"])
    claw = _claw(s) if s else None
    if not _ok(claw):
        return None
    cw = claw["median_wall_s"]
    cp, cp_plain = _cp(s), _cp_plain(s)
    fixed = data.get("clawconvert_floor")
    if t["target"].startswith(("T3", "T5")) and "plain cp" not in t["target"] and _ok(cp) and _ok(fixed):
        f, c = fixed["median_wall_s"], cp["median_wall_s"]
        text = (f"clawconvert's fixed cost (interpreter, imports, planning: the same command on a "
                f"{gb(fixed['checkpoint_bytes'])} checkpoint) is {secs(f)}, which cp does not pay; the rest, "
                f"{secs(cw - f)}, is {(cw - f) / c:.2f}x cp + fsync's {secs(c)}")
        cpu, cpus = _cpu(claw), (data.get("machine") or {}).get("cpus")
        if cpu and cpus:
            text += (f"; clawconvert used {secs(cpu)} of CPU (user + sys) in {secs(cw)}, {cpu / cw:.1f} of the "
                     f"{cpus} cores on average" + (": CPU-bound on every core" if cpu / cw > 0.8 * cpus else
                                                  ": a serial CPU stage, not the disk, sets the pace" if cpu / cw > 0.8
                                                  else ""))
        return text
    if "plain cp" in t["target"] and _ok(cp) and _ok(cp_plain):
        c, p = cp["median_wall_s"], cp_plain["median_wall_s"]
        return (f"clawconvert fsyncs its outputs before it reports success and plain cp stops at the page cache: "
                f"cp + fsync of the same bytes takes {secs(c)} against plain cp's {secs(p)} ({c / p:.2f}x) by itself")
    if t["target"].startswith(("T6", "T8")) and "faster" in t["target"]:
        peer = next((p for _, p in _role(s, "peer") if _ok(p)), None)
        prod = next((p for _, p in _role(s, "compute") if _ok(p)), None)
        if not peer:
            return None
        need = peer["median_wall_s"] / T18_MERGE_TIME
        parts = [f"{T18_MERGE_TIME:.0f}x PEFT means {secs(need)} in all"]
        if prod:
            parts.append(f"the LoRA products alone, with no I/O, take {secs(prod['median_wall_s'])} on this machine")
        if _ok(cp):
            parts.append(f"a durable copy of the same bytes (cp + fsync) {secs(cp['median_wall_s'])}")
        if prod and _ok(cp):
            both = max(prod["median_wall_s"], cp["median_wall_s"])
            verdict = ("so even perfectly overlapped the two exceed it" if both > need else
                       f"perfectly overlapped they would fit ({secs(both)}); clawconvert spends "
                       f"{secs(cw - both)} more than the slower of the two")
            parts.append(verdict)
        return "; ".join(parts)
    return None


def _short(run: dict) -> str:
    text = run.get("status", "") + " " + run.get("log_tail", "")
    if "No space left on device" in text or "disk full" in text:
        return "disk full (the shared disk filled up)"
    return run.get("status", "")[:60]


def _row_ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.1f}x"


def table(data: dict) -> str:
    lines: list[str] = []
    st = data.get("settings", {})
    m = data.get("machine", {})
    lines.append(f"Medians of {st.get('reps')} runs per tool, tools alternating within each repetition. "
                 f"Page cache: {st.get('page_cache')} (source files "
                 + ("read into the page cache" if st.get("page_cache") == "warm" else "evicted from the page cache")
                 + " before every run; outputs deleted after each run). clawconvert fsyncs its outputs, so the "
                 "floor is `cp` + fsync of the copies; the peers' save_pretrained and plain `cp` stop at the page "
                 "cache. Peak RSS = ru_maxrss of the process as GNU time reports it. "
                 f"Machine: {m.get('cpus')} CPUs, {gib(m.get('memory_total_bytes'))} RAM, shared; load average "
                 f"{', '.join(f'{x:.1f}' for x in m.get('load_before', []))} at the start, "
                 f"{', '.join(f'{x:.1f}' for x in m.get('load_after', []))} at the end.")
    floor = data.get("clawconvert_floor")
    if floor and _ok(floor):
        lines.append(f"\nclawconvert's fixed cost (the same convert on a {gb(floor['checkpoint_bytes'])} checkpoint: "
                     f"interpreter, imports, planning): {secs(floor['median_wall_s'])}, peak RSS "
                     f"{gib(floor['median_peak_rss_bytes'])}.")
        for label, imp in (floor.get("imports") or {}).items():
            if _ok(imp):
                lines.append(f"- {label}: {secs(imp['median_wall_s'])}, peak RSS {gib(imp['median_peak_rss_bytes'])}")
    startup = data.get("startup") or {}
    if all(_ok(startup.get(k)) for k in (STARTUP_BASE, STARTUP_CMD)):
        b, c = startup[STARTUP_BASE], startup[STARTUP_CMD]
        lines.append(f"\nStart-up, medians of {len(c['runs'])} alternating runs: `{STARTUP_CMD}` "
                     f"{c['median_wall_s']:.3f} s ({gib(c['median_peak_rss_bytes'])}), `{STARTUP_BASE}` "
                     f"{b['median_wall_s']:.3f} s: {c['median_wall_s'] / b['median_wall_s']:.2f}x.")
    for scen in data.get("scenarios", []):
        lines.append(f"\n### {scen['number']}. {scen['title']}\n")
        lines.append("| size | checkpoint | tool | wall (median) | peak RSS (median) | RSS / checkpoint "
                     "| wall / (cp + fsync) | wall / cp | tool / clawconvert: wall, RSS |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---|")
        for s in scen["sizes"]:
            claw, cp, cp_plain = _claw(s), _cp(s), _cp_plain(s)
            first = True
            for name, t in s["tools"].items():
                head = f"{s['size']} | {s['arch']} {s['dtype']}, {gb(s['checkpoint_bytes'])}" if first else " | "
                first = False
                if not _ok(t):
                    extra = ""
                    if t.get("peak_rss_at_failure_bytes"):
                        extra = f" at {gib(t['peak_rss_at_failure_bytes'])}, {secs(t.get('wall_at_failure_s'))}"
                    lines.append(f"| {head} | {name} | {t.get('status', 'not run')}{extra} | | | | | |")
                    continue
                w, r = t["median_wall_s"], t["median_peak_rss_bytes"]
                frac = f"{r / s['checkpoint_bytes']:.0%}" if t["role"] in ("clawconvert", "peer") else ""
                vs_cp = _row_ratio(w, cp.get("median_wall_s")) if _ok(cp) and t["role"] != "floor" else ""
                vs_plain = (_row_ratio(w, cp_plain.get("median_wall_s"))
                            if _ok(cp_plain) and t["role"] in ("clawconvert", "peer") else "")
                vs = ""
                if t["role"] == "peer" and _ok(claw):
                    vs = f"{_row_ratio(w, claw['median_wall_s'])} slower, {_row_ratio(r, claw['median_peak_rss_bytes'])} more RSS"
                partial = ""
                if t.get("status", "ok") != "ok":
                    bad = [x for x in t["runs"] if x["status"] != "ok"]
                    why = "; ".join(sorted({_short(x) for x in bad}))
                    partial = f" ({t['status'].removeprefix('ok (')[:-1]}; {len(bad)} failed: {why})"
                lines.append(f"| {head} | {name}{partial} | {secs(w)} | {gib(r)} | {frac} | {vs_cp} | {vs_plain} | {vs} |")
        if scen.get("skipped"):
            for name, why in scen["skipped"].items():
                lines.append(f"\n{name}: {why}.")
    targets = data.get("targets", [])
    if targets:
        scoped = [t for t in targets if t["in_scope"]]
        lines.append("\n### Targets (issues 5 and 18)\n")
        if not scoped:
            lines.append("No target applies to the sizes run (tiny shapes); figures for reference:")
        for t in scoped or targets:
            mark = "MET" if t["met"] else "MISSED" if t["met"] is False else "UNDETERMINED"
            lines.append(f"- **{mark}** [{t['scenario']}] {t['target']}: {t['text']}")
        missed = [t for t in scoped if t["met"] is False]
        if missed:
            lines.append(f"\n{len(missed)} of {len(scoped)} target checks MISSED.")
            whys = [(t, explain(t, data)) for t in missed]
            if any(w for _, w in whys):
                lines.append("\n### Why the misses (from the floors measured in the same run)\n")
                for t, w in whys:
                    lines.append(f"- [{t['scenario']}] {t['target']}: {w or 'no floor in this run explains it'}.")
        elif scoped:
            lines.append(f"\nAll {len(scoped)} target checks met.")
    for p in data.get("plots", []):
        lines.append(f"\nplot: {p}")
    return "\n".join(lines)


def plots(data: dict, out_dir: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(no plots: matplotlib is not installed; pip install -e '.[bench]')"]
    written = []
    scen = next((s for s in data.get("scenarios", []) if s["key"] == "openclip-hf"), None)
    colors = {"clawconvert": "tab:blue", "peer": "tab:red", "floor": "tab:gray", "reference": "silver"}
    if scen and scen["sizes"]:
        for what, key, ylabel, fname in (("peak RSS", "median_peak_rss_bytes", "peak RSS (GiB)", "memory_vs_size.png"),
                                         ("wall time", "median_wall_s", "wall time (s)", "time_vs_size.png")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            names = list(scen["sizes"][0]["tools"])
            for name in names:
                role = scen["sizes"][0]["tools"][name]["role"]
                xs, ys, fx, fy = [], [], [], []
                for s in scen["sizes"]:
                    t = s["tools"].get(name, {})
                    x = s["checkpoint_bytes"] / 1e9
                    if _ok(t):
                        xs.append(x)
                        ys.append(t[key] / 2**30 if "rss" in key else t[key])
                    elif str(t.get("status", "")).startswith(("failed", "skipped: failed")):
                        v = t.get("peak_rss_at_failure_bytes") if "rss" in key else t.get("wall_at_failure_s")
                        if v:
                            fx.append(x)
                            fy.append(v / 2**30 if "rss" in key else v)
                if xs:
                    ax.plot(xs, ys, "o-", color=colors.get(role), label=name, lw=2 if role == "clawconvert" else 1.5)
                if fx:
                    ax.plot(fx, fy, "x", color=colors.get(role), ms=10, mew=2, label=f"{name}: failed (OOM)")
                for x, y, s in zip(xs, ys, [s for s in scen["sizes"] if _ok(s["tools"].get(name, {}))]):
                    if role == "clawconvert":
                        ax.annotate(s["size"], (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
            xs_all = [s["checkpoint_bytes"] / 1e9 for s in scen["sizes"]]
            floor = data.get("clawconvert_floor")
            if floor and _ok(floor):
                v = floor[key] / 2**30 if "rss" in key else floor[key]
                ax.axhline(v, color="tab:blue", lw=0.8, ls="-.",
                           label=f"clawconvert on a {gb(floor['checkpoint_bytes'])} checkpoint (start-up, imports)")
            if "rss" in key:
                ax.plot(xs_all, [x * 1e9 * T_RSS_FRACTION / 2**30 for x in xs_all], "--", color="tab:green",
                        lw=1, label="target: 15% of the checkpoint")
                lim = data.get("settings", {}).get("mem_limit_bytes")
                if lim:
                    ax.axhline(lim / 2**30, color="black", lw=0.8, ls=":", label="bench memory limit")
            else:
                cp = [(s["checkpoint_bytes"] / 1e9, _cp(s)["median_wall_s"]) for s in scen["sizes"] if _ok(_cp(s))]
                if cp:
                    ax.plot([c[0] for c in cp], [c[1] * T_WALL_CP for c in cp], "--", color="tab:green", lw=1,
                            label="target: 1.5x cp")
            ax.set_xlabel("checkpoint size (GB)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{scen['title']}: {what} vs checkpoint size")
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            ax.set_xlim(left=0)
            ax.legend(fontsize=7, loc="upper left")
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=110)
            plt.close(fig)
            written.append(_rel(out_dir / fname))
    # every scenario at its largest size: bars per tool
    groups = []
    for s in data.get("scenarios", []):
        ok_sizes = [z for z in s["sizes"] if any(_ok(t) for t in z["tools"].values())]
        if ok_sizes:
            z = max(ok_sizes, key=lambda z: z["checkpoint_bytes"])
            groups.append((f"{s['number']}\n{s['key']}\n{z['size']} {gb(z['checkpoint_bytes'])}", z))
    if groups:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key, label in ((axes[0], "median_wall_s", "wall time (s)"),
                               (axes[1], "median_peak_rss_bytes", "peak RSS (GiB)")):
            width = 0.8 / 3
            for gi, (title, z) in enumerate(groups):
                for ti, role in enumerate(("clawconvert", "peer", "floor")):
                    for j, (name, t) in enumerate(_role(z, role)):
                        off = (ti - 1) * width + j * width / max(1, len(_role(z, role)))
                        v = t.get(key)
                        failed = v is None and str(t.get("status", "")).startswith("failed")
                        if failed:
                            v = t.get("peak_rss_at_failure_bytes") if "rss" in key else t.get("wall_at_failure_s")
                        if v is None:
                            continue
                        v = v / 2**30 if "rss" in key else v
                        ax.bar(gi + off, v, width / max(1, len(_role(z, role))), color=colors[role],
                               hatch="//" if failed else None, alpha=0.5 if failed else 1,
                               label={"clawconvert": "clawconvert", "peer": "peer path", "floor": "cp"}[role]
                               if gi == 0 and j == 0 else None)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([g[0] for g in groups], fontsize=7)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_title("wall time, largest size of each scenario (hatched: failed)")
        axes[1].set_title("peak RSS, largest size of each scenario (hatched: failed)")
        fig.tight_layout()
        fig.savefig(out_dir / "scenarios.png", dpi=110)
        plt.close(fig)
        written.append(_rel(out_dir / "scenarios.png"))
    return written


def _rel(path: Path) -> str:
    root = Path(__file__).resolve().parents[1]
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json")
    data = json.loads(path.read_text())
    data["targets"] = evaluate_targets(data)
    data["plots"] = plots(data, path.parent)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
