"""Input-pipeline throughput against bare JPEG decode + resize, side by side.

  python -m mmjax.bench.data --config experiments/data_bench.py --workdir /tmp/bench-data
  python -m mmjax.bench.data --config experiments/data_bench.py --workdir DIR \\
      --config.bench.measure_seconds=5 --profile_batches=8

Generates (`mmjax.bench.data_shards`; once, reused while the generation
settings match) WebDataset tar shards of the three streams under
`<workdir>/shards` (or `bench.data_dir`; a local temporary folder when
--workdir is a gs:// bucket): caption samples (a JPEG of a
smooth picture with shapes and mild noise, and a 15-30 word caption),
interleaved documents (2-6 JPEGs with paragraphs between, 100-400 words)
and text documents (300-800 words). Points
`config.data.sources.*` at them and then measures, in one run:

  bare         a plain loop calling `decode_and_resize(jpeg, image_size)` over
               the same JPEG bytes (read out of the shards into memory first):
               images/s in one process.
  in-process   `make_dataset(...)` with `data.workers=0`: packed sequences,
               images (`image_mask`), examples and non-pad tokens per second.
  workers=W    the same with `data.workers=W` (the config value, at least 1);
               rates per worker are the rate divided by W.

Each pipeline first reads `bench.warmup_batches` batches (for workers this
covers their start-up), untimed. The `bench.measure_seconds` of each mode
are then split into `bench.rounds` rounds that visit the modes in turn, so
load from other processes on the machine affects all of them alike.
The headline number is `pipeline images/s per worker / bare images/s`, with
the target >= 0.80 (the pipeline may spend at most a fifth of its time on
anything other than decoding and resizing). Also reported: packing
efficiency (non-pad tokens / (sequences * seq_len)), images per sequence
and the same ratio per CPU-second (`cpu-ratio`: bare counts its thread,
in-process the whole process, workers the worker processes), which other
load on the machine disturbs less than wall-clock rates.

Outputs in --workdir: results.csv (one row per mode), summary.json,
shards/ (the generated data) and, with --profile_batches, profile.txt and
profile.prof (cProfile of the in-process pipeline, costs per image).
"""

from __future__ import annotations

import cProfile
import json
import marshal
import os
import platform
import pstats
import re
import sys
import tempfile
import time
from collections.abc import Iterable

import numpy as np

from mmjax.bench.data_shards import STREAMS, prepare_shards, read_images
from mmjax.paths import is_remote, workdir_path, write_bytes, write_csv, write_text

TARGET_RATIO = 0.80
MODES = ("bare", "inprocess", "workers")


# --------------------------------------------------------------------------- #
# Measurements
# --------------------------------------------------------------------------- #


def _descendants_cpu() -> float | None:
    """CPU seconds (user + system) used so far by the living descendants of
    this process (the pipeline's worker processes), from Linux /proc; None
    where that cannot be read."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        parent, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # exited meanwhile
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            parent[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError, IndexError):
        return None
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(children.get(os.getpid(), ()))
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += children.get(pid, ())
    return total


class _Totals:
    """What one mode counted over all its timed chunks."""

    def __init__(self):
        self.wall = self.cpu = self.main_cpu = 0.0
        self.cpu_known = True
        self.counts = dict(batches=0, sequences=0, images=0, examples=0, tokens=0, skipped_images=0,
                           skipped_records=0, dropped_images=0)
        self.streams = np.zeros(len(STREAMS), np.int64)
        self.round_rates: list[float] = []


class BareDecode:
    """`decode_and_resize(b, image_size)` in a plain loop over the JPEG bytes,
    continuing round after round where the previous chunk stopped. CPU time is
    the calling thread's."""

    name, workers = "bare", 1

    def __init__(self, images: list[bytes], size: int):
        if not images:
            raise ValueError("no images to decode: the shards hold no image members")
        self.images, self.size, self.pos = images, size, 0
        self.totals = _Totals()

    def start(self) -> None:
        from mmjax.data.images import decode_and_resize

        self._decode = decode_and_resize
        for b in self.images[:8]:
            decode_and_resize(b, self.size)

    def chunk(self, seconds: float) -> float:
        """Decodes for `seconds`; returns this chunk's images/s."""
        decode, images, size = self._decode, self.images, self.size
        n, c0, t0 = 0, time.thread_time(), time.perf_counter()
        while True:
            decode(images[self.pos], size)
            self.pos = (self.pos + 1) % len(images)
            n += 1
            if n % 8 == 0 and time.perf_counter() - t0 >= seconds:
                break
        wall = time.perf_counter() - t0
        t = self.totals
        t.wall += wall
        t.cpu += time.thread_time() - c0
        t.counts["images"] += n
        t.round_rates.append(n / wall)
        return n / wall

    def close(self) -> None:
        pass


class PipelineRun:
    """Batches of `make_dataset(...)` with `data.workers=workers`.

    `start` builds the iterator and reads `bench.warmup_batches` batches
    (worker start-up included there). Each `chunk` then counts batches for the
    given seconds. With workers, a chunk first takes (untimed) every batch the
    workers prefetched meanwhile and one more, so the clock starts when the
    workers have just begun fresh batches and no ready batch is counted as
    free. CPU time is the main process's (in-process) or the workers' (their
    sum; the main process's share is kept as `main_cpu`).
    """

    def __init__(self, config, tokenizer, workers: int):
        self.config, self.tokenizer, self.workers = config, tokenizer, int(workers)
        self.name = _mode_name(self.workers)
        self.totals = _Totals()
        self.first_batch_s = self.warmup_s = None
        self._it = None

    def start(self) -> None:
        from mmjax.data.pipeline import make_dataset

        data = self.config.data.copy_and_resolve_references()
        data.workers = self.workers
        self._buffer = int(data.worker_buffer)
        t0 = time.perf_counter()
        self._it = iter(make_dataset(data, self.tokenizer, batch_size=self.config.bench.batch_size))
        next(self._it)
        self.first_batch_s = time.perf_counter() - t0
        for _ in range(max(int(self.config.bench.warmup_batches) - 1, 0)):
            next(self._it)
        self.warmup_s = time.perf_counter() - t0

    def chunk(self, seconds: float) -> float:
        """Counts batches for `seconds`; returns this chunk's images/s."""
        it, t = self._it, self.totals
        if self.workers:
            for _ in range((self._buffer + 1) * self.workers + 1):
                next(it)
            w0 = _descendants_cpu()
        c0, t0 = time.process_time(), time.perf_counter()
        images0 = t.counts["images"]
        while True:
            batch = next(it)
            c = t.counts
            c["batches"] += 1
            c["sequences"] += int(batch["tokens"].shape[0])
            c["images"] += int(batch["image_mask"].sum())
            c["examples"] += int(batch["num_examples"].sum())
            c["tokens"] += int((batch["segment_ids"] > 0).sum())
            for k in ("skipped_images", "skipped_records", "dropped_images"):
                c[k] += int(batch[k].sum())
            t.streams += batch["stream_counts"].sum(0)
            del batch
            wall = time.perf_counter() - t0
            if wall >= seconds:
                break
        cpu = time.process_time() - c0
        t.wall += wall
        if self.workers:
            w1 = _descendants_cpu()
            t.main_cpu += cpu
            if w0 is None or w1 is None:
                t.cpu_known = False
            else:
                t.cpu += w1 - w0
        else:
            t.cpu += cpu
        rate = (t.counts["images"] - images0) / wall
        t.round_rates.append(rate)
        return rate

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None


def _mode_name(workers: int) -> str:
    return "in-process" if workers == 0 else f"workers={workers}"


def _result(mode, seq_len: int, bare_ips: float | None, bare_ipc: float | None) -> dict:
    """The numbers reported for one mode."""
    t = mode.totals
    c, per = t.counts, max(mode.workers, 1)
    pipe = isinstance(mode, PipelineRun)
    ips = c["images"] / t.wall
    ipc = c["images"] / t.cpu if t.cpu > 0 and t.cpu_known else None
    r = dict(mode=mode.name, workers=mode.workers, seconds=t.wall, **(c if pipe else {"images": c["images"]}),
             images_per_s=ips, images_per_s_per_worker=ips / per,
             ratio_to_bare=(ips / per / bare_ips) if pipe and bare_ips else None,
             cpu_s=t.cpu if t.cpu_known else None, images_per_cpu_s=ipc,
             cpu_ratio_to_bare=(ipc / bare_ipc) if pipe and ipc and bare_ipc else None,
             round_images_per_s=t.round_rates)
    if pipe:
        r.update(
            sequences_per_s=c["sequences"] / t.wall, examples_per_s=c["examples"] / t.wall,
            tokens_per_s=c["tokens"] / t.wall,
            packing_efficiency=c["tokens"] / max(c["sequences"] * seq_len, 1),
            images_per_sequence=c["images"] / max(c["sequences"], 1),
            examples_per_sequence=c["examples"] / max(c["sequences"], 1),
            stream_examples=dict(zip(STREAMS, (int(s) for s in t.streams))),
            first_batch_s=mode.first_batch_s, warmup_s=mode.warmup_s)
        if mode.workers:
            r["main_process_cpu_s"] = t.main_cpu
    return r


def profile_pipeline(config, tokenizer, batches: int, top: int = 25) -> tuple[str, pstats.Stats]:
    """cProfile of `batches` in-process batches (after one untimed batch);
    returns (a report with the costs per decoded image, the stats).

    The profiler runs on its usual wall clock (a CPU clock would cost a
    system call per event and inflate small functions). When other
    processes take CPU time from this one, the report scales every time by
    the main thread's CPU share over the profiled span (CPU seconds / wall
    seconds), so that the figures estimate CPU time."""
    from mmjax.data.pipeline import make_dataset

    data = config.data.copy_and_resolve_references()
    data.workers = 0
    it = iter(make_dataset(data, tokenizer, batch_size=config.bench.batch_size))
    next(it)
    prof, in_batches = cProfile.Profile(), 0
    c0, t0 = time.thread_time(), time.perf_counter()
    prof.enable()
    for _ in range(batches):
        in_batches += int(next(it)["image_mask"].sum())
    prof.disable()
    cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    close = getattr(it, "close", None)
    if close is not None:
        close()
    stats = pstats.Stats(prof)
    decoded = sum(v[1] for (file, _, func), v in stats.stats.items()
                  if func == "decode_and_resize" and file.endswith(os.path.join("mmjax", "data", "images.py")))
    n = decoded or in_batches
    share = min(cpu / wall, 1.0) if wall > 0 else 1.0
    per = 1000.0 * share / max(n, 1)
    lines = [(f"cProfile of {batches} in-process batches: {decoded} images decoded, {in_batches} images in the "
              f"batches; {wall:.2f}s wall, main thread on a CPU {share:.0%} of it; "
              f"{cpu * 1000 / max(n, 1):.2f} ms of main-thread CPU per decoded image (profiler overhead included)"),
             "ms per decoded image" + (f" (wall times x {share:.2f}, the CPU share)" if share < 0.99 else "") + ":"]
    header = f"{'cum ms':>8s} {'self ms':>8s} {'calls':>7s}  function"
    for title, key in (("by cumulative time", 3), ("by self time", 2)):
        lines += ["", title, header]
        for (file, line, func), (_, calls, self_t, cum_t, _) in sorted(stats.stats.items(),
                                                                        key=lambda kv: -kv[1][key])[:top]:
            where = f"{_short(file)}:{line}" if line else file
            lines.append(f"{cum_t * per:8.3f} {self_t * per:8.3f} {calls / max(n, 1):7.2f}  {func} ({where})")
    return "\n".join(lines), stats


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path[path.index("site-packages/") + len("site-packages/"):]
    if "mmjax/" in path:
        return path[path.index("mmjax/"):]
    return path


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #

_CSV_FIELDS = ("mode", "workers", "sequences_per_s", "images_per_s", "images_per_s_per_worker", "ratio_to_bare",
               "tokens_per_s", "packing_efficiency", "images_per_sequence", "images_per_cpu_s",
               "cpu_ratio_to_bare")


def _fmt(value, spec: str) -> str:
    """`value` formatted by `spec`, or a "-" of the same width when absent."""
    if value is None:
        width = re.match(r"\d*", spec).group()
        return "-".rjust(int(width) if width else 1)
    return format(value, spec)


def run(config, workdir: str, *, modes: Iterable[str] = MODES, profile_batches: int = 0,
        profile_top: int = 25, log=print) -> dict:
    """The whole benchmark (see module doc); returns the summary written to
    `<workdir>/summary.json`."""
    modes = tuple(modes)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; expected some of {MODES}")
    from mmjax.data.pipeline import default_tokenizer
    from mmjax.data.sources import resolve_paths

    workdir = workdir_path(workdir)
    if not is_remote(workdir):
        os.makedirs(workdir, exist_ok=True)
    bench, data = config.bench, config.data
    size, seq_len = int(data.image_size), int(data.seq_len)
    rounds = max(int(bench.rounds), 1)
    # The shards are read as local files: on a bucket workdir they are made in a local temporary folder.
    shard_dir = bench.data_dir or (tempfile.mkdtemp(prefix="mmjax-bench-shards-") if is_remote(workdir)
                                   else os.path.join(workdir, "shards"))
    specs = prepare_shards(shard_dir, bench, log=log, accept_existing=bool(bench.data_dir))
    for stream, spec in specs.items():
        config.data.sources[stream] = spec
    tokenizer = default_tokenizer(data)
    workers = max(int(data.workers), 1)
    load_before = os.getloadavg()
    log(f"[setup] seq_len={seq_len} max_images={data.max_images} image_size={size} "
        f"tokens_per_image={data.tokens_per_image} mix={tuple(data.mix_weights)} "
        f"pack_window={data.pack_window} batch_size={bench.batch_size}; {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.2f}")

    runs = []
    shard_info: dict = {}
    try:
        if "bare" in modes:
            paths = [p for s in STREAMS for p in resolve_paths(specs[s].partition(":")[2], s)]
            images = read_images(paths)
            shard_info = dict(images=len(images), mean_jpeg_bytes=float(np.mean([len(b) for b in images])))
            log(f"[bare] {len(images)} JPEGs read into memory (mean {shard_info['mean_jpeg_bytes'] / 1024:.1f} "
                f"KiB); each round runs decode_and_resize(jpeg, {size}) in a plain loop")
            runs.append(BareDecode(images, size))
            runs[-1].start()
        if "inprocess" in modes:
            runs.append(PipelineRun(config, tokenizer, 0))
            runs[-1].start()
            log(f"[in-process] make_dataset with data.workers=0: first batch after {runs[-1].first_batch_s:.1f}s, "
                f"warm-up ({bench.warmup_batches} batches) done after {runs[-1].warmup_s:.1f}s")
        if "workers" in modes:
            runs.append(PipelineRun(config, tokenizer, workers))
            runs[-1].start()
            log(f"[workers={workers}] make_dataset with data.workers={workers}: first batch (worker start-up) "
                f"after {runs[-1].first_batch_s:.1f}s, warm-up ({bench.warmup_batches} batches) done after "
                f"{runs[-1].warmup_s:.1f}s (excluded from the rates)")
        chunk = float(bench.measure_seconds) / rounds
        log(f"[measure] {rounds} rounds x {chunk:g}s per mode, modes in turn each round")
        for r in range(rounds):
            rates = [f"{m.name} {m.chunk(chunk):.1f}" for m in runs]
            log(f"[round {r + 1}/{rounds}] images/s: " + " | ".join(rates))
    finally:
        for m in runs:
            m.close()
    load_after = os.getloadavg()

    bare = next((m for m in runs if m.name == "bare"), None)
    bare_ips = bare.totals.counts["images"] / bare.totals.wall if bare else None
    bare_ipc = bare.totals.counts["images"] / bare.totals.cpu if bare and bare.totals.cpu > 0 else None
    results = {m.name: _result(m, seq_len, bare_ips, bare_ipc) for m in runs}

    log("")
    log(f"data pipeline throughput: seq_len {seq_len}, <= {data.max_images} images of {size}x{size} "
        f"(from {bench.source_image_size[0]}x{bench.source_image_size[1]} JPEG q{bench.jpeg_quality}), "
        f"batch {bench.batch_size}, {bench.measure_seconds:g}s per mode in {rounds} rounds, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    header = (f"{'mode':12s} {'workers':>7s} {'seq/s':>7s} {'images/s':>9s} {'img/s/wkr':>9s} "
              f"{'ratio':>6s} {'tokens/s':>9s} {'packing':>7s} {'img/seq':>7s} {'ex/seq':>6s} "
              f"{'img/cpu-s':>9s} {'cpu-ratio':>9s}")
    log(header)
    log("-" * len(header))
    for r in results.values():
        log(f"{r['mode']:12s} {r['workers']:>7} "
            f"{_fmt(r.get('sequences_per_s'), '7.2f')} {r['images_per_s']:9.1f} "
            f"{r['images_per_s_per_worker']:9.1f} {_fmt(r['ratio_to_bare'], '6.3f')} "
            f"{_fmt(r.get('tokens_per_s'), '9.0f')} {_fmt(r.get('packing_efficiency'), '7.3f')} "
            f"{_fmt(r.get('images_per_sequence'), '7.2f')} {_fmt(r.get('examples_per_sequence'), '6.2f')} "
            f"{_fmt(r['images_per_cpu_s'], '9.1f')} {_fmt(r['cpu_ratio_to_bare'], '9.3f')}")
    log("")
    verdicts, cpu_verdicts = {}, {}
    for r in results.values():
        if r["ratio_to_bare"] is None:
            continue
        verdict = "PASS" if r["ratio_to_bare"] >= TARGET_RATIO else "BELOW"
        verdicts[r["mode"]] = verdict
        log(f"ratio {r['mode']:12s} pipeline images/s per worker / bare decode+resize images/s = "
            f"{r['ratio_to_bare']:.3f}  (target >= {TARGET_RATIO:.2f}): {verdict}")
        if r["skipped_images"] or r["skipped_records"]:
            log(f"  note: {r['skipped_images']} images / {r['skipped_records']} records were skipped")
    for r in results.values():
        if r["cpu_ratio_to_bare"] is None:
            continue
        cpu_verdicts[r["mode"]] = "PASS" if r["cpu_ratio_to_bare"] >= TARGET_RATIO else "BELOW"
        log(f"cpu-ratio {r['mode']:12s} pipeline images per worker CPU-second / bare images per CPU-second = "
            f"{r['cpu_ratio_to_bare']:.3f}  (target >= {TARGET_RATIO:.2f}): {cpu_verdicts[r['mode']]}")
    if cpu_verdicts:
        log("  (CPU seconds: bare counts its thread, in-process the whole process, workers the worker "
            "processes; other load on the machine disturbs this less than the wall-clock rates)")
    contended = False
    if bare and bare.totals.cpu > 0:
        share = bare.totals.cpu / bare.totals.wall
        contended = share < 0.9
        if contended:
            log(f"note: the bare loop ran on a CPU only {share:.0%} of its wall time: other processes were "
                f"competing for the {os.cpu_count()} CPUs (load average {load_before[0]:.1f} -> "
                f"{load_after[0]:.1f}), so the wall-clock ratios are unreliable; trust cpu-ratio or rerun "
                "on a quiet machine")
    if "BELOW" in {*verdicts.values(), *cpu_verdicts.values()} and not profile_batches:
        log("(run again with --profile_batches=8 to see where the pipeline time goes)")

    profile_text = None
    if profile_batches:
        log(f"\n[profile] cProfile of {profile_batches} in-process batches")
        profile_text, stats = profile_pipeline(config, tokenizer, profile_batches, profile_top)
        log(profile_text)
        write_text(workdir / "profile.txt", profile_text + "\n")
        write_bytes(workdir / "profile.prof", marshal.dumps(stats.stats))  # what Stats.dump_stats writes

    write_csv(workdir / "results.csv", _CSV_FIELDS,
              [{k: ("" if r.get(k) is None else r.get(k)) for k in _CSV_FIELDS} for r in results.values()])
    summary = dict(
        target_ratio=TARGET_RATIO,
        verdicts=verdicts,
        cpu_verdicts=cpu_verdicts,
        machine_contended=contended,
        results=results,
        shards=dict(dir=shard_dir, sources=specs, **shard_info),
        data=dict(seq_len=seq_len, max_images=int(data.max_images), image_size=size,
                  tokens_per_image=int(data.tokens_per_image), mix_weights=list(data.mix_weights),
                  pack_window=int(data.pack_window), workers=workers, worker_buffer=int(data.worker_buffer)),
        bench=bench.to_dict(),
        machine=dict(_machine(), load_average_before=load_before, load_average_after=load_after),
        profile=profile_text,
    )
    write_text(workdir / "summary.json", json.dumps(summary, indent=1, default=str))
    log(f"wrote {workdir / 'results.csv'} and summary.json")
    return summary


def _machine() -> dict:
    import grain
    import PIL
    from PIL import features

    return dict(cpus=os.cpu_count(), python=sys.version.split()[0], platform=platform.platform(),
                pillow=PIL.__version__, libjpeg_turbo=bool(features.check_feature("libjpeg_turbo")),
                grain=getattr(grain, "__version__", "?"), numpy=np.__version__)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", None,
        "Benchmark config file (experiments/data_bench.py); 'FILE:ARG' passes ARG to get_config "
        "('smoke' shrinks everything). Override fields with --config.<path>=<value>, e.g. "
        "--config.bench.measure_seconds=5 or --config.data.workers=2.")
    workdir = flags.DEFINE_string(
        "workdir", None,
        "Output directory: results.csv, summary.json, shards/ (generated data, reused on later runs "
        "unless bench.data_dir is set) and, with --profile_batches, profile.txt/profile.prof.")
    modes = flags.DEFINE_list(
        "modes", list(MODES),
        "Which measurements to run: bare (decode_and_resize loop), inprocess (pipeline, workers=0), "
        "workers (pipeline, data.workers worker processes).")
    profile = flags.DEFINE_integer(
        "profile_batches", 0,
        "After the measurements, cProfile this many in-process batches and print the top costs "
        "per image (0: no profile).")
    top = flags.DEFINE_integer("profile_top", 25, "Functions listed in each profile table.")
    flags.mark_flags_as_required(["config", "workdir"])
    return config, workdir, modes, profile, top


def main(argv=None) -> int:
    from absl import app, logging

    config, workdir, modes, profile, top = _define_flags()

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        from absl import flags

        if not flags.FLAGS["verbosity"].present:  # library INFO chatter hides the progress lines
            logging.set_verbosity(logging.WARNING)
        run(config.value, workdir.value, modes=modes.value, profile_batches=profile.value,
            profile_top=top.value, log=lambda s: print(s, flush=True))

    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl itself would exit 1
    app.run(_main, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
