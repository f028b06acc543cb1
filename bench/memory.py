"""Peak memory and time of one graph: `ldm-run` vs real ComfyUI, run one after the other.

`python -m bench.memory --workflow FILE --models-dir DIR [--comfy-dir DIR --comfy-python PY]
[--comfy-args "--fp16-unet"] [--out FILE]`

- ours: `ldm-run FILE --models-dir DIR --output-dir WORK/out_ours --device cpu` in a fresh
  process. Peak RSS is that process's `ru_maxrss` (from `os.wait4`, the kernel's own
  high-water mark of its resident set); time is its whole wall clock: interpreter
  start-up, imports, checkpoint loads and the run.
- ComfyUI: `PY COMFY_DIR/main.py --cpu [ARGS] --listen 127.0.0.1 --port PORT
  --base-directory WORK/comfy_base --disable-auto-launch`, its `models/` a symlink to DIR.
  Once `/system_stats` answers (its start-up time is reported apart), the API-format
  graph is POSTed to `/prompt` and `/history/<id>` is polled until it is done; then the
  server is stopped (SIGINT) and its `ru_maxrss` read the same way. Peak RSS is the
  server's whole life (its idle RSS is in the notes); time is submission to finish, so
  it leaves out ComfyUI's start-up but includes its checkpoint loads. `--comfy-args` may
  be given more than once: one ComfyUI run per value, each compared with ours.

Both sides also sample `/proc/PID/status` every 0.2 s for the peak of RssAnon (memory the
process wrote, as opposed to file pages of memory-mapped checkpoints, which also count
in RSS but the kernel can drop); that column is a sample, it can miss a short peak.
Each child gets `oom_score_adj` 1000 right after it starts, so should memory run out, the
kernel kills the measured program and not a neighbour; a killed run is reported as such,
with the peak it had reached. Runs never overlap. Standard library only; prints a markdown table (stdout),
progress on stderr. Wall times on a shared machine are noisy: run it on an idle one.

Reproduce the SDXL base + refiner numbers (ComfyUI's own example graph
sdxl/sdxl_refiner_prompt_example.png from comfyanonymous/ComfyUI_examples, its API-format
`prompt` with node 5 at 512×512, node 10 at steps 3 / end_at_step 2 and node 11 at
steps 3 / start_at_step 2; random weights in the release layouts, fp16 like the released
files):

    python -m ldm_core synth sdxl MODELS/checkpoints/sd_xl_base_1.0.safetensors --dtype fp16
    python -m ldm_core synth sdxl_refiner MODELS/checkpoints/sd_xl_refiner_1.0.safetensors --dtype fp16
    eval "$(../shared/tools/setup-comfy COMFY_GIT)"      # ComfyUI v0.3.64, CPU torch
    python -m bench.memory --workflow sdxl_refiner_api.json --models-dir MODELS \\
        --comfy-dir "$COMFY_DIR" --comfy-python "$COMFY_PY" --comfy-args "--fp16-unet" --comfy-args ""

Without `--comfy-dir` only ours is measured.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .table import Row, emit
from .timing import progress

RSS_TARGET = 1.0  # our peak RSS / ComfyUI's
TIME_TARGET = 1.0  # our wall time / ComfyUI's (submission to finish)
SAMPLE_S = 0.2
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    program: str
    peak: int | None = None  # bytes, ru_maxrss of the process
    anon: int = 0  # bytes, largest RssAnon sampled
    seconds: float | None = None
    startup: float | None = None  # ComfyUI: until /system_stats answers
    idle: int | None = None  # ComfyUI: VmHWM when it was up, before the prompt
    failed: str | None = None
    load: float | None = None  # 1-minute load average when it finished (others' work skews the time)
    images: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- processes
def _status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status, in bytes ({} once it is gone)."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def _spawn(cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` (output to `log`) as the first one the kernel kills should memory run out."""
    progress("+ " + shlex.join(cmd))
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd)
    try:  # raising one's own child's score needs no privilege
        Path(f"/proc/{proc.pid}/oom_score_adj").write_text("1000\n")
    except OSError:
        pass
    return proc


def _running(proc: subprocess.Popen) -> bool:
    """Whether `proc` still runs; unlike Popen.poll() this does not reap it, so that _reap gets its usage."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def _reap(proc: subprocess.Popen) -> tuple[int, int]:
    """Wait for `proc`; (exit code as subprocess gives it, its ru_maxrss in bytes)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024  # Linux: KiB


def _exit_text(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exit {code}"


def _tail(log: Path, n: int = 3) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return " / ".join(x.strip()[-200:] for x in lines[-n:])


# --------------------------------------------------------------------------------------------- images
def _png_size(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _images(folder: Path, before: set[Path]) -> list[str]:
    out = []
    for p in sorted(set(folder.rglob("*")) - before):
        if p.is_file():
            size = _png_size(p) if p.suffix.lower() == ".png" else None
            out.append(f"{p.name} {size[0]}×{size[1]}" if size else p.name)
    return out


def _png_text(path: Path) -> dict[str, str]:
    """tEXt chunks of a PNG (ComfyUI stores `prompt` and `workflow` there)."""
    data, out, i = path.read_bytes(), {}, 8
    while i + 8 <= len(data):
        (n,), kind = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8]
        if kind == b"tEXt":
            key, _, value = data[i + 8:i + 8 + n].partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        i += 12 + n
    return out


def api_prompt(workflow: Path) -> dict:
    """The API-format graph that ComfyUI's /prompt takes, from a .json (API format) or a ComfyUI .png."""
    if workflow.suffix.lower() == ".png":
        text = _png_text(workflow).get("prompt")
        if text is None:
            raise SystemExit(f"{workflow}: no `prompt` (API format) text chunk")
        graph = json.loads(text)
    else:
        graph = json.loads(workflow.read_text())
    if "nodes" in graph and "links" in graph:
        raise SystemExit(f"{workflow} is in the editor format; ComfyUI's /prompt needs the API format "
                         "(export it with 'Save (API)', or pass the .png that carries it)")
    return graph


# --------------------------------------------------------------------------------------------- ours
def ldm_run_command() -> list[str]:
    script = Path(sys.executable).parent / "ldm-run"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ldm_nodes.cli import main; sys.exit(main())"]


def run_ours(args: argparse.Namespace, work: Path) -> Result:
    out_dir = work / "out_ours"
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.rglob("*"))
    cmd = [*ldm_run_command(), str(args.workflow), "--models-dir", str(args.models_dir), "--output-dir", str(out_dir),
           *shlex.split(args.ldm_args)]
    if args.input_dir:
        cmd += ["--input-dir", str(args.input_dir)]
    res = Result("ldm-run " + args.ldm_args)
    log = work / "ours.log"
    t0 = time.perf_counter()
    proc = _spawn(cmd, log)
    while _running(proc):
        res.anon = max(res.anon, _status(proc.pid).get("RssAnon", 0))
        time.sleep(SAMPLE_S)
    code, res.peak = _reap(proc)
    res.seconds, res.load = time.perf_counter() - t0, os.getloadavg()[0]
    if code != 0:
        res.failed = f"{_exit_text(code)}: {_tail(log)}"
    res.images = _images(out_dir, before)
    progress(f"ours: {res.seconds:.1f} s, peak RSS {gib(res.peak)} GiB{'; ' + res.failed if res.failed else ''}")
    return res


# --------------------------------------------------------------------------------------------- ComfyUI
def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def comfy_base(work: Path, models_dir: Path) -> Path:
    """A ComfyUI base directory whose models/ is `models_dir` (a symlink) and with no custom nodes."""
    base = work / "comfy_base"
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "models"
    if link.is_symlink() or link.exists():
        if link.resolve() != models_dir.resolve():
            raise SystemExit(f"{link} exists and is not a link to {models_dir}")
    else:
        link.symlink_to(models_dir.resolve(), target_is_directory=True)
    return base


def comfy_version(comfy_dir: Path) -> str:
    version = "?"
    try:
        for line in (comfy_dir / "comfyui_version.py").read_text().splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    commit = comfy_dir / ".setup-comfy-commit"
    return version + (f" ({commit.read_text().strip()[:10]})" if commit.is_file() else "")


def run_comfy(args: argparse.Namespace, work: Path, extra: str, prompt: dict) -> Result:
    res = Result(f"ComfyUI {comfy_version(args.comfy_dir)} --cpu {extra}".strip())
    if not _port_free(args.port):
        res.failed = f"port {args.port} is already in use (another server?)"
        return res
    base = comfy_base(work, args.models_dir)
    out_dir = base / "output"
    before = set(out_dir.rglob("*"))
    cmd = [args.comfy_python, str(args.comfy_dir / "main.py"), "--cpu", *shlex.split(extra),
           "--listen", "127.0.0.1", "--port", str(args.port), "--base-directory", str(base), "--disable-auto-launch"]
    if args.input_dir:
        cmd += ["--input-directory", str(args.input_dir)]
    url = f"http://127.0.0.1:{args.port}"
    log = work / f"comfy{'_' + '_'.join(shlex.split(extra)).strip('-') if extra.strip() else ''}.log"
    t0 = time.perf_counter()
    proc = _spawn(cmd, log, cwd=args.comfy_dir)
    try:
        while True:  # start-up
            if not _running(proc):
                _, res.peak = _reap(proc)
                res.failed = f"server did not start ({_exit_text(proc.returncode)}): {_tail(log)}"
                return res
            try:
                _get(url + "/system_stats", 2.0)
                break
            except (urllib.error.URLError, OSError, ValueError):
                if time.perf_counter() - t0 > args.timeout:
                    res.failed = "server start-up timed out"
                    return res
                time.sleep(SAMPLE_S)
        res.startup = time.perf_counter() - t0
        res.idle = _status(proc.pid).get("VmHWM")
        progress(f"ComfyUI up in {res.startup:.1f} s (RSS high-water mark {gib(res.idle)} GiB); submitting")
        body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(url + "/prompt", body, {"Content-Type": "application/json"})
        t1 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            res.failed = f"/prompt refused the graph: {e.read().decode(errors='replace')[:500]}"
            return res
        last_poll = 0.0
        while True:
            if not _running(proc):
                res.seconds = time.perf_counter() - t1
                code, res.peak = _reap(proc)
                res.failed = f"server died while running ({_exit_text(code)}): {_tail(log)}"
                break
            res.anon = max(res.anon, _status(proc.pid).get("RssAnon", 0))
            res.load = os.getloadavg()[0]
            now = time.perf_counter()
            if now - last_poll >= 0.5:
                last_poll = now
                try:
                    entry = _get(f"{url}/history/{prompt_id}").get(prompt_id)
                except (urllib.error.URLError, OSError, ValueError):
                    entry = None
                status = (entry or {}).get("status") or {}
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    res.seconds = time.perf_counter() - t1
                    if status.get("status_str") != "success":
                        errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                        detail = errors[0] if errors else {}
                        res.failed = (f"{detail.get('node_type', '?')}: {detail.get('exception_type', '')} "
                                      f"{detail.get('exception_message', '')}".strip()) if detail else "error"
                    break
            if time.perf_counter() - t1 > args.timeout:
                res.failed = "run timed out"
                break
            time.sleep(SAMPLE_S)
    finally:
        if proc.returncode is None:  # not reaped yet
            if _running(proc):
                proc.send_signal(signal.SIGINT)
                deadline = time.perf_counter() + 30
                while _running(proc) and time.perf_counter() < deadline:
                    time.sleep(SAMPLE_S)
                if _running(proc):
                    proc.kill()
            _, res.peak = _reap(proc)
    res.images = _images(out_dir, before)
    progress(f"ComfyUI {extra or '(defaults)'}: {fmt_s(res.seconds)} s, peak RSS {gib(res.peak)} GiB"
             f"{'; ' + res.failed if res.failed else ''}")
    return res


# --------------------------------------------------------------------------------------------- report
def gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def fmt_s(t: float | None) -> str:
    return "—" if t is None else f"{t:.1f}"


def header(args: argparse.Namespace) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = {}
    try:
        mem = {k: int(v.split()[0]) * 1024 for k, _, v in
               (x.partition(":") for x in Path("/proc/meminfo").read_text().splitlines())}
    except (OSError, ValueError, IndexError):
        pass
    try:
        git = ["git", "-C", str(REPO), "--no-optional-locks"]
        head, dirty = (subprocess.run(git + cmd, capture_output=True, text=True, check=False).stdout.strip()
                       for cmd in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
        commit = f"{head}{' + uncommitted changes' if dirty else ''}" if head else "?"
    except OSError:
        commit = "?"
    digest = hashlib.sha256(args.workflow.read_bytes()).hexdigest()[:12]
    return [
        (f"CPU: {cpu} ({os.cpu_count()} logical cores), RAM {gib(mem.get('MemTotal'))} GiB "
         f"({gib(mem.get('MemAvailable'))} GiB available at start), load average "
         f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; Python {platform.python_version()}"),
        f"workflow: {args.workflow} (sha256 {digest}); models: {args.models_dir}; ldm_core at {commit}",
        ("peak RSS: ru_maxrss of the process (ComfyUI: the server's whole life); anon: largest RssAnon sampled "
         f"every {SAMPLE_S} s; time: ours = whole process, ComfyUI = POST /prompt to finish (start-up apart)"),
    ]


def report(args: argparse.Namespace, ours: Result, comfy: list[Result]) -> list[str]:
    head = ["program", "peak RSS (GiB)", "peak anon (GiB)", "wall time (s)",
            "RSS ratio ours/this", "time ratio ours/this", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    verdicts = []
    for r in [ours, *comfy]:
        notes = []
        if r.startup is not None:
            notes.append(f"server start-up {r.startup:.1f} s (idle {gib(r.idle)} GiB)")
            if r.seconds is not None and not r.failed:
                notes.append(f"start-up + run {r.startup + r.seconds:.1f} s (ours/that "
                             f"{ours.seconds / (r.startup + r.seconds):.2f})")
        if r.failed:
            notes.append(f"**{r.failed}**")
        notes.append("images: " + (", ".join(r.images) if r.images else "none"))
        if r.load is not None:
            notes.append(f"load average {r.load:.1f} at the end")
        ratios = ["—", "—"]
        if r is not ours:
            mem = Row(f"peak RSS vs {r.program}", ours.peak, None if r.failed else r.peak, RSS_TARGET)
            tim = Row(f"time vs {r.program}", ours.seconds, None if r.failed else r.seconds, TIME_TARGET)
            ratios = [f"{x.ratio:.2f} ({x.verdict})" if x.ratio is not None else "—" for x in (mem, tim)]
            verdicts += [mem, tim]
        lines.append("| " + " | ".join([f"`{r.program}`", gib(r.peak), gib(r.anon or None), fmt_s(r.seconds),
                                         *ratios, "; ".join(notes)]) + " |")
    if comfy:
        lines += ["", (f"Targets: ours ≤ {RSS_TARGET:g}× ComfyUI's peak RSS and ≤ {TIME_TARGET:g}× its time; "
                       "a ComfyUI run that failed has no ratio.")]
    return lines


def _glue(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`--comfy-args "--fp16-unet"` -> `--comfy-args=--fp16-unet`: argparse takes a value that starts with
    a dash for an option of its own."""
    out, it = [], iter(argv)
    for a in it:
        out.append(f"{a}={next(it, '')}" if a in options else a)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--workflow", type=Path, required=True,
                   help="the graph: API-format .json (or a ComfyUI .png carrying one)")
    p.add_argument("--models-dir", type=Path, required=True, help="ComfyUI-style models folder (checkpoints/, ...)")
    p.add_argument("--input-dir", type=Path, help="input folder for LoadImage nodes, given to both")
    p.add_argument("--ldm-args", default="--device cpu", help="extra ldm-run arguments (default: %(default)s)")
    p.add_argument("--comfy-dir", type=Path, help="a ComfyUI checkout (e.g. $COMFY_DIR); without it, ours only")
    p.add_argument("--comfy-python", default=os.environ.get("COMFY_PY"),
                   help="ComfyUI's python (default: $COMFY_PY)")
    p.add_argument("--comfy-args", action="append",
                   help='extra ComfyUI arguments after --cpu, e.g. "--fp16-unet"; repeat for one run each '
                        '("" = its defaults; default: one run with "")')
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before giving up")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ldm-bench/memory"),
                   help="outputs, logs and ComfyUI's base directory (default: %(default)s)")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    args = p.parse_args(_glue(sys.argv[1:] if argv is None else argv, ("--comfy-args", "--ldm-args")))
    args.workflow, args.models_dir = args.workflow.resolve(), args.models_dir.resolve()
    if not args.workflow.is_file():
        p.error(f"no such workflow: {args.workflow}")
    if args.comfy_dir is not None:
        args.comfy_dir = args.comfy_dir.resolve()
        if not (args.comfy_dir / "main.py").is_file():
            p.error(f"{args.comfy_dir} has no main.py")
        if not args.comfy_python:
            p.error("--comfy-python (or $COMFY_PY) is needed with --comfy-dir")
    args.comfy_args = args.comfy_args or [""]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    prompt = api_prompt(args.workflow) if args.comfy_dir else None
    lines = ["# Peak memory and time: ldm-run vs ComfyUI", "", *[f"- {h}" for h in header(args)], ""]
    ours = run_ours(args, args.work_dir)
    comfy = [run_comfy(args, args.work_dir, extra, prompt) for extra in args.comfy_args] if args.comfy_dir else []
    emit(lines + report(args, ours, comfy), args.out)
    return 0 if ours.failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
