"""clawconvert benchmark suite: clawconvert against the peer paths, side by side.

    .venv/bin/python bench/run.py --sizes B32,L14,H14,bigG --reps 3

For every scenario in ``bench/scenarios.py`` (OpenCLIP -> HF at each size; big_vision
So400m .npz -> HF and -> OpenCLIP; merge-lora into a 1B LLM; extract-visual from the
largest checkpoint) it

1. writes the synthetic checkpoint (real architecture, seeded random weights, streamed
   tensor by tensor, ``bench/synth.py``) unless ``bench/cache/`` already holds it;
2. runs clawconvert, each peer path (``bench/peers.py``) and ``cp`` of the same bytes as
   separate processes, alternating A B C A B C for ``--reps`` repetitions, and records
   wall time and peak RSS as the OS reports it (``bench/measure.py``);
3. writes ``bench/results/latest.json`` with every figure, ``memory_vs_size.png`` /
   ``time_vs_size.png`` / ``scenarios.png``, prints a table of medians and ratios, and
   says plainly which of the issue's targets are met and which are missed.

Page cache: by default every run starts with its source files read into the page cache
(``--page-cache warm``), ``cp`` included, and every output is deleted after its run.
clawconvert fsyncs what it writes, so the floor is ``cp`` followed by an fsync of the
copies; plain ``cp`` (page cache only, as the peers' ``save_pretrained``) is listed next
to it for reference.  ``--page-cache cold`` evicts the source files
(``posix_fadvise DONTNEED``, no root needed) before every run instead.

Smoke run (seconds on an idle machine; what ``tests/test_bench_smoke.py`` runs)::

    .venv/bin/python bench/run.py --tiny --sizes tiny --reps 1 --scenarios openclip-hf --results /tmp/b

This process never imports torch (the synthetic checkpoints are written by a child), so
it stays small; measured commands run under GNU time, whose figure is theirs alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
import report  # noqa: E402
from scenarios import BY_KEY, SYNTH_VERSION, Scenario, Tool  # noqa: E402

PY = sys.executable
SCHEMA = 1
SIZE_ORDER = ["tiny", "tiny2", "B32", "L14", "H14", "bigG"]
DEFAULT_DTYPE = {"openclip": {"bigG": "fp16"}, "big_vision": {}, "llm-lora": {}, "vlm-lora": {}}
KIND_DTYPE = {"openclip": "fp32", "big_vision": "fp32", "llm-lora": "bf16", "vlm-lora": "bf16"}
FLOOR_SIZE = "tiny"   # clawconvert's own start-up footprint is measured on this checkpoint
STARTUP_REPS = 7      # start-up (issue 18): `clawconvert inspect` on the fixture against `import numpy`
IMPORT_FOOTPRINTS = (
    ("python, nothing imported", "pass"),
    ("python + numpy", "import numpy"),
    ("python + import torch", "import torch"),
    ("python + clawconvert's conversion modules (api, every format and family)",
     "import clawconvert.api; from clawconvert.formats import all_formats; "
     "from clawconvert.families import all_families; all_formats(); all_families()"),
    ("python + torch + transformers CLIPModel + open_clip (what the peer imports)",
     "import torch, open_clip; from transformers import CLIPModel, CLIPTokenizer, CLIPImageProcessor"),
)


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().replace("IB", "").replace("B", "")
    num = t.rstrip("KMGT")
    return int(float(num) * units[t[len(num):]])


def child_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    return env


def compile_package() -> None:
    """Byte-compile clawconvert's modules as installing its wheel does (the peers' packages
    were compiled by pip): from an editable install with PYTHONDONTWRITEBYTECODE set, every
    measured run would otherwise recompile them first (about 0.1 s)."""
    import compileall
    compileall.compile_dir(str(ROOT / "clawconvert"), quiet=1)


def log(msg: str) -> None:
    print(msg, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results_dir = Path(args.results).resolve()
        self.cache = Path(args.cache).resolve()
        self.tmp = self.results_dir / "tmp"
        self.env = child_env()
        self.mem_limit = parse_bytes(args.mem_limit) if args.mem_limit else None
        self.min_available = parse_bytes(args.min_available) if args.min_available else None
        self._probes: dict[tuple[str, str], bool] = {}
        self.data: dict = {}

    # -- availability ----------------------------------------------------------------------
    def available(self, tool: Tool) -> bool:
        for req in tool.requires:
            if req not in self._probes:
                kind, name = req
                if kind == "command":
                    argv = [PY, "-m", "clawconvert", name, "--help"]
                else:
                    argv = [PY, "-c", "import sys; from clawconvert.formats import all_formats; "
                                      f"sys.exit(0 if {name!r} in all_formats() else 1)"]
                rc = subprocess.run(argv, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL).returncode
                self._probes[req] = rc == 0
                log(f"  probe {kind} {name}: {'available' if rc == 0 else 'not available'}")
            if not self._probes[req]:
                return False
        return True

    # -- checkpoints -----------------------------------------------------------------------
    def dtype_for(self, kind: str, size: str) -> str:
        if self.args.dtype and kind == "openclip":
            return self.args.dtype
        return DEFAULT_DTYPE[kind].get(size, KIND_DTYPE[kind])

    def checkpoint(self, kind: str, size: str) -> tuple[Path, dict]:
        dtype = self.dtype_for(kind, size)
        path = self.cache / f"{kind}-{size}-{dtype}-seed{self.args.seed}"
        meta = path / "bench_checkpoint.json"
        if meta.is_file():
            info = json.loads(meta.read_text())
            if info.get("synth_version") == SYNTH_VERSION:
                return path, info
        log(f"  writing synthetic {kind} {size} ({dtype}) -> {path}")
        self.cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run([PY, str(HERE / "synth.py"), kind, size, dtype, str(path), str(self.args.seed)],
                              cwd=ROOT, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench: writing the synthetic {kind} {size} checkpoint failed:\n{proc.stderr[-3000:]}")
        info = json.loads(meta.read_text())
        log(f"  wrote {info['bytes'] / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
        return path, info

    # -- running ---------------------------------------------------------------------------
    def argv(self, tool: Tool, scenario: Scenario, ckpt: Path, info: dict, dst: Path) -> list[str]:
        subs = {"{py}": PY, "{peers}": str(HERE / "peers.py"), "{floors}": str(HERE / "floors.py"), "{ckpt}": str(ckpt),
                "{src}": scenario.src.replace("{ckpt}", str(ckpt)), "{dst}": str(dst)}
        out: list[str] = []
        for a in tool.argv:
            if a == "{claw}":
                out += [PY, "-m", "clawconvert"]
            elif a == "{weights}":
                out += [str(ckpt / w) for w in info["weights"]]
            else:
                for k, v in subs.items():
                    a = a.replace(k, v)
                out.append(a)
        return out

    def source_files(self, ckpt: Path, info: dict) -> list[Path]:
        return [ckpt / w for w in info["weights"]]

    def run_tool(self, tool: Tool, scenario: Scenario, size: str, rep: int, ckpt: Path, info: dict) -> dict:
        slug = f"{scenario.key}-{size}-{scenario.tools.index(tool)}-{tool.role}-r{rep}"
        work = self.tmp / slug
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        dst = work / "out"
        if tool.role in ("floor", "reference"):
            dst.mkdir()
        files = self.source_files(ckpt, info)
        cache_s = measure.warm_page_cache(files) if self.args.page_cache == "warm" else measure.drop_page_cache(files)
        res = measure.run_measured(self.argv(tool, scenario, ckpt, info, dst), work / "log.txt", cwd=ROOT,
                                   env=self.env, timeout=self.args.timeout, mem_limit=self.mem_limit,
                                   min_available=self.min_available, output=dst)
        out = res.to_json()
        out.update(rep=rep, page_cache_s=round(cache_s, 3))
        if not self.args.keep_outputs:
            shutil.rmtree(work, ignore_errors=True)
        rss = f"{res.peak_rss_bytes / 2**30:.2f} GiB" if res.peak_rss_bytes else "?"
        log(f"    {tool.name[:60]:<60} rep {rep}: {res.status[:90]}, {res.wall_s:.1f} s, peak RSS {rss}")
        return out

    def sizes_for(self, s: Scenario) -> list[str]:
        wanted = [x for x in self.args.sizes.split(",") if x]
        if s.follows_sizes:
            pool = s.tiny_sizes if self.args.tiny else s.sizes
            return [x for x in wanted if x in pool] or list(pool[:1] if self.args.tiny else [])
        if s.largest_size_only:
            pool = [x for x in wanted if x in SIZE_ORDER and (x.startswith("tiny") == self.args.tiny)]
            return [max(pool, key=SIZE_ORDER.index)] if pool else []
        return list(s.tiny_sizes if self.args.tiny else s.sizes)

    def run_scenario(self, s: Scenario) -> dict:
        log(f"\nScenario {s.number}: {s.title}")
        entry = {"key": s.key, "number": s.number, "title": s.title, "source": s.source,
                 "large_sizes": list(s.large), "sizes": [], "tools": [], "skipped": {}}
        self.data["scenarios"].append(entry)     # saved as it fills, so a crash keeps what ran
        tools = []
        for t in s.tools:
            if self.args.no_peers and t.role == "peer":
                continue
            entry["tools"].append({"name": t.name, "role": t.role, "argv": list(t.argv), "note": t.note})
            if self.available(t):
                tools.append(t)
            else:
                entry["skipped"][t.name] = "skipped: command not available"
                log(f"  {t.name}: skipped: command not available")
        sizes = self.sizes_for(s)
        failed_oom: dict[str, str] = {}
        for size in sizes:
            ckpt, info = self.checkpoint(s.source, size)
            size_entry = {"size": size, "arch": info["arch"], "dtype": info["dtype"], "params": info["params"],
                          "checkpoint_bytes": info["bytes"], "in_scope": size in s.large,
                          "tools": {t.name: {"role": t.role, "runs": []} for t in s.tools}}
            for name, why in entry["skipped"].items():
                size_entry["tools"][name]["status"] = why
            entry["sizes"].append(size_entry)
            log(f"  {size}: {info['arch']}, {info['dtype']}, {info['bytes'] / 1e9:.2f} GB")
            for rep in range(self.args.reps):
                for t in tools:
                    slot = size_entry["tools"][t.name]
                    if t.name in failed_oom:
                        slot["status"] = f"skipped: {failed_oom[t.name]}"
                        continue
                    if any(r["status"] != "ok" for r in slot["runs"]):
                        continue        # a failure is not repeated
                    run = self.run_tool(t, s, size, rep, ckpt, info)
                    slot["runs"].append(run)
                    self.save()
                    if run["status"].startswith("failed (OOM") and t.role == "peer":
                        failed_oom[t.name] = f"failed (OOM) at the smaller size {size}"
            for name, slot in size_entry["tools"].items():
                summarize(slot)
        return entry

    def run_floor(self) -> dict | None:
        """clawconvert's fixed cost: the same command on a few-MB checkpoint (start-up, imports),
        and what the interpreter and the libraries it imports hold before any tensor is read."""
        if self.args.tiny or self.args.no_floor or "openclip-hf" not in self.keys:
            return None
        log("\nclawconvert start-up floor (convert of a 7 MB OpenCLIP checkpoint) and import footprints")
        s = BY_KEY["openclip-hf"]
        ckpt, info = self.checkpoint("openclip", FLOOR_SIZE)
        tool = s.tools[0]
        slot = {"role": "clawconvert", "runs": [self.run_tool(tool, s, FLOOR_SIZE, r, ckpt, info)
                                                for r in range(self.args.reps)],
                "checkpoint_bytes": info["bytes"]}
        summarize(slot)
        imports = {}
        for label, code in IMPORT_FOOTPRINTS:
            runs = []
            for r in range(self.args.reps):
                work = self.tmp / f"footprint-{len(imports)}-r{r}"
                work.mkdir(parents=True, exist_ok=True)
                res = measure.run_measured([PY, "-c", code], work / "log.txt", cwd=ROOT, env=self.env,
                                           timeout=self.args.timeout, mem_limit=self.mem_limit,
                                           min_available=self.min_available)
                runs.append({**res.to_json(), "rep": r})
                shutil.rmtree(work, ignore_errors=True)
            imports[label] = summarize({"role": "reference", "code": code, "runs": runs})
            log(f"    {label:<60} {imports[label].get('median_wall_s', 0):.1f} s, "
                f"peak RSS {imports[label].get('median_peak_rss_bytes', 0) / 2**30:.2f} GiB")
        slot["imports"] = imports
        return slot

    def run_startup(self) -> dict | None:
        """Start-up (issue 18): ``clawconvert inspect fixtures/openclip_tiny`` against ``python -c
        "import numpy"``, alternating, STARTUP_REPS times each; medians compared."""
        if self.args.tiny or self.args.no_floor:
            return None
        log(f"\nstart-up: clawconvert inspect of the fixture against import numpy, {STARTUP_REPS} runs each")
        tools = {"python -c 'import numpy'": [PY, "-c", "import numpy"],
                 "clawconvert inspect fixtures/openclip_tiny": [PY, "-m", "clawconvert", "inspect",
                                                               str(ROOT / "fixtures" / "openclip_tiny")]}
        slots = {name: {"role": "reference", "argv": argv, "runs": []} for name, argv in tools.items()}
        for r in range(STARTUP_REPS):
            for name, argv in tools.items():
                work = self.tmp / f"startup-r{r}"
                work.mkdir(parents=True, exist_ok=True)
                res = measure.run_measured(argv, work / "log.txt", cwd=ROOT, env=self.env, timeout=60,
                                           mem_limit=self.mem_limit, min_available=self.min_available)
                slots[name]["runs"].append({**res.to_json(), "rep": r})
                shutil.rmtree(work, ignore_errors=True)
        for name, slot in slots.items():
            summarize(slot)
            log(f"    {name:<45} {slot.get('median_wall_s', 0):.3f} s, "
                f"peak RSS {slot.get('median_peak_rss_bytes', 0) / 2**20:.0f} MiB")
        return slots

    # -- output ------------------------------------------------------------------------------
    def save(self) -> None:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / "latest.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(path)

    def run(self) -> int:
        a = self.args
        self.keys = [k for k in (a.scenarios.split(",") if a.scenarios != "all" else BY_KEY) if k]
        unknown = [k for k in self.keys if k not in BY_KEY]
        if unknown:
            raise SystemExit(f"bench: unknown scenario {', '.join(unknown)} (known: {', '.join(BY_KEY)})")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.data = {
            "schema": SCHEMA,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([".venv/bin/python", "bench/run.py", *sys.argv[1:]]),
            "settings": {"reps": a.reps, "sizes": a.sizes, "tiny": a.tiny, "page_cache": a.page_cache,
                         "mem_limit_bytes": self.mem_limit, "min_available_bytes": self.min_available,
                         "timeout_s": a.timeout, "seed": a.seed, "order": "alternating: every tool once per rep, "
                         "in the order listed, reps repeated", "measure": "GNU time %M (ru_maxrss of the command) "
                         "and wall clock around the process", "bytecode": "clawconvert byte-compiled first, "
                         "as a wheel install does"},
            "machine": machine_info(),
            "clawconvert_floor": None,
            "startup": None,
            "scenarios": [],
        }
        self.save()
        compile_package()
        self.data["clawconvert_floor"] = self.run_floor()
        self.data["startup"] = self.run_startup()
        self.save()
        for key in self.keys:
            self.run_scenario(BY_KEY[key])
            self.save()
        self.data["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.data["machine"]["load_after"] = list(os.getloadavg())
        self.data["targets"] = report.evaluate_targets(self.data)
        self.data["plots"] = report.plots(self.data, self.results_dir)
        self.save()
        text = report.table(self.data)
        (self.results_dir / "latest.md").write_text(text + "\n")
        print("\n" + text)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return 0


def summarize(slot: dict) -> dict:
    ok = [r for r in slot["runs"] if r["status"] == "ok"]
    if ok:
        slot["median_wall_s"] = round(statistics.median(r["wall_s"] for r in ok), 3)
        slot["median_peak_rss_bytes"] = int(statistics.median(r["peak_rss_bytes"] for r in ok))
        slot["min_wall_s"] = min(r["wall_s"] for r in ok)
        slot["max_wall_s"] = max(r["wall_s"] for r in ok)
        slot["output_bytes"] = ok[0].get("output_bytes")
        slot["status"] = "ok" if len(ok) == len(slot["runs"]) else f"ok ({len(ok)} of {len(slot['runs'])} runs)"
    elif slot["runs"]:
        slot["status"] = slot["runs"][0]["status"]
        slot["peak_rss_at_failure_bytes"] = max((r.get("peak_rss_bytes") or r.get("watchdog_peak_rss_bytes") or 0)
                                                for r in slot["runs"]) or None
        slot["wall_at_failure_s"] = slot["runs"][0]["wall_s"]
    else:
        slot.setdefault("status", "not run")
    return slot


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_before": list(os.getloadavg())}
    try:
        import psutil
        info["memory_total_bytes"] = psutil.virtual_memory().total
        info["memory_available_bytes_at_start"] = psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        out = subprocess.run([PY, "-c", "import torch, transformers, open_clip, safetensors; "
                              "print(torch.__version__, transformers.__version__, open_clip.__version__, "
                              "safetensors.__version__)"], capture_output=True, text=True, env=child_env())
        t, tr, oc, st = out.stdout.split()
        info["versions"] = {"torch": t, "transformers": tr, "open_clip": oc, "safetensors": st}
        for name in ("peft", "clawconvert"):
            r = subprocess.run([PY, "-c", f"import importlib.metadata as m; print(m.version('{name}'))"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                info["versions"][name] = r.stdout.strip()
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "clawconvert", "mappings"], cwd=ROOT,
                               capture_output=True, text=True)
        info["clawconvert_commit"] = rev.stdout.strip() + (" (+ uncommitted engine changes)" if dirty.stdout.strip() else "")
    except (ValueError, OSError):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See docs/bench.md for the latest figures.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="B32,L14,H14,bigG",
                   help="scenario 1 sizes (B32,L14,H14,bigG; tiny,tiny2 with --tiny); scenario 4 runs at the largest")
    p.add_argument("--reps", type=int, default=3, help="repetitions per tool (default 3)")
    p.add_argument("--scenarios", default="all", help=f"comma list of {', '.join(BY_KEY)} (default all)")
    p.add_argument("--tiny", action="store_true", help="smoke run: every scenario on its tiny shapes")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the OpenCLIP checkpoints (default fp32, fp16 for bigG)")
    p.add_argument("--page-cache", choices=["warm", "cold"], default="warm",
                   help="source files read into the page cache before each run (warm, default) or evicted (cold)")
    p.add_argument("--mem-limit", default="20GiB",
                   help="address-space limit and RSS ceiling for every measured command (default 20GiB)")
    p.add_argument("--min-available", default="1GiB",
                   help="kill a measured command when the machine's MemAvailable drops below this (default 1GiB)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    p.add_argument("--no-peers", action="store_true", help="run clawconvert and cp only")
    p.add_argument("--no-floor", action="store_true", help="skip the clawconvert start-up floor measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(HERE / "results"), help="output folder (default bench/results)")
    p.add_argument("--cache", default=str(HERE / "cache"), help="synthetic checkpoints (default bench/cache)")
    p.add_argument("--keep-outputs", action="store_true", help="keep every run's output under RESULTS/tmp")
    args = p.parse_args(argv)
    if args.tiny and args.sizes == p.get_default("sizes"):
        args.sizes = "tiny,tiny2"
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
