"""Regenerate the synthetic results table (issue 15; README, "Results on the synthetic miniature").

    python results/synthetic_table.py                  # every run of seeds 0-4, then the table (about 2 h, 2 cores)
    python results/synthetic_table.py --report-only    # the table again from the committed logs (the seeds there)
    python results/synthetic_table.py --seeds 0 --jobs 1 --out /tmp/t   # one seed, elsewhere

Every method runs its script's `synthetic` preset (the one miniature protocol) with its paper's full method and with
the script's own supervised baseline (the same script with the method's terms switched off), on the same seeds; a
seed fixes the labeled split (the same 125 of 1,000 images in every script), the initialisation and the data order.
"Supervised, all labels" is hung2018's baseline with --labeled 1.0. Nothing is tuned here: the arguments below are
the scripts' defaults plus the switches that name the variant.

Each run leaves, in OUT/runs/<run>_seed<k>/: args.json, labeled.txt, log.jsonl, metrics.json, stdout.txt (the
printed log) and curves.png (predictions.png for seed 0); checkpoints are deleted. A run whose metrics.json exists
is not run again, so an interrupted table continues where it stopped. Then OUT/synthetic_table.{md,json,png} are
written and the markdown replaces the part of README.md between the two `synthetic-table` marker comments.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUP_HUNG = ["--lambda-adv", "0", "--lambda-adv-unl", "0", "--lambda-semi", "0"]
# name: (script, extra arguments, what the table calls it)
RUNS = {
    "supervised_all": ("hung2018", ["--labeled", "1.0"] + SUP_HUNG, "supervised, all labels (hung2018 baseline)"),
    "hung_sup": ("hung2018", SUP_HUNG, "hung2018 baseline (L_ce only)"),
    "hung_full": ("hung2018", [], "hung2018: L_ce + L_adv + L_semi"),
    "latent_sup": ("latent_classes", ["--lambda-latent", "0", "--lambda-cons", "0", "--lambda-adv", "0",
                                      "--lambda-adv-unl", "0"], "latent_classes baseline (Table 3)"),
    "latent_full": ("latent_classes", [], "latent classes: full method"),
    "s4gan_sup": ("s4gan_mlmt", ["--lambda-fm", "0", "--lambda-st", "0", "--stage", "s4gan"],
                  "s4gan_mlmt baseline (CE only)"),
    "s4gan_full": ("s4gan_mlmt", [], "s4GAN (and + MLMT: the same run's fused output)"),
    "dual_sup": ("dual_disc", ["--ablation", "baseline"], "dual_disc baseline (DeepLab-v3+, labeled only)"),
    "dual_full": ("dual_disc", [], "dual_disc: D1 + D2 + semi-supervised"),
    "luc_sup": ("luc2016", ["--lambda-adv", "0"], "luc2016 baseline, all labels (lambda_adv 0)"),
    "luc_adv": ("luc2016", [], "luc2016: adversarial, all labels"),
}
# rows of the table: (row name, run, metric path, baseline row or None, the paper's claim)
ROWS = [
    ("supervised, 1/8 (hung2018 baseline)", "hung_sup", ("miou",), None, ""),
    ("hung2018, 1/8", "hung_full", ("miou",), "supervised, 1/8 (hung2018 baseline)", "Hung full > baseline"),
    ("latent_classes baseline, 1/8", "latent_sup", ("miou",), None, ""),
    ("latent classes, 1/8", "latent_full", ("miou",), "latent_classes baseline, 1/8", "latent classes > baseline"),
    ("s4gan_mlmt supervised, 1/8", "s4gan_sup", ("miou",), None, ""),
    ("s4GAN, 1/8", "s4gan_full", ("miou",), "s4gan_mlmt supervised, 1/8", "s4GAN > supervised"),
    ("s4GAN + MLMT, 1/8", "s4gan_full", ("fused", "miou"), "s4GAN, 1/8", "s4GAN + MLMT >= s4GAN"),
    ("dual_disc supervised, 1/8", "dual_sup", ("miou",), None, ""),
    ("dual_disc full, 1/8", "dual_full", ("miou",), "dual_disc supervised, 1/8", "full > supervised"),
    ("luc2016 supervised, all labels", "luc_sup", ("miou",), None, ""),
    ("luc2016 adversarial, all labels", "luc_adv", ("miou",), "luc2016 supervised, all labels",
     "adversarial >= supervised (mIoU or BF)"),
    ("luc2016 supervised, all labels: BF", "luc_sup", ("bf_mean",), None, ""),
    ("luc2016 adversarial, all labels: BF", "luc_adv", ("bf_mean",), "luc2016 supervised, all labels: BF", ""),
    ("supervised, all labels (hung2018 baseline)", "supervised_all", ("miou",), None, ""),
]
# the last logged values that explain an effect or its absence (README: "which effects did not appear and why")
DIAGNOSTICS = ["D_real", "D_fake", "semi_kept", "st_selected", "D1_real", "D1_fake", "D2_conf", "C_map", "threshold",
               "trusted", "a_real", "a_fake", "teacher_map", "student_map"]


def run_one(name, seed, out, threads):
    script, extra, _ = RUNS[name]
    run_dir = os.path.join(out, "runs", f"{name}_seed{seed}")
    if os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return name, seed, "kept"
    if os.path.isdir(run_dir):                     # an unfinished run: start it again from scratch
        for f in os.listdir(run_dir):
            os.remove(os.path.join(run_dir, f))
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, f"{script}.py", "--data", "synthetic", "--seed", str(seed), "--out", run_dir] + extra
    if seed != 0:
        cmd += ["--num-pictures", "0"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.txt"), "w") as log:
        log.write("$ " + " ".join(cmd[1:]) + "\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {rc}); see {run_dir}/stdout.txt")
    with open(os.path.join(run_dir, "wall_time.json"), "w") as f:
        json.dump({"seconds": round(wall, 1), "threads": threads, "parallel_jobs": ARGS.jobs}, f)
    for f in os.listdir(run_dir):                 # no checkpoints in results/
        if f.endswith(".pt") or f.endswith(".pt.tmp"):
            os.remove(os.path.join(run_dir, f))
    return name, seed, f"{wall:.0f} s"


def get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def last_logged(run_dir):
    vals = {}
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    for k in DIAGNOSTICS:
                        if k in rec:
                            vals[k] = rec[k]
    try:                                           # s4gan_mlmt: the MLMT classifier's val mAP (metrics.json)
        with open(os.path.join(run_dir, "metrics.json")) as f:
            mlmt = json.load(f).get("mlmt") or {}
        vals.update({k: mlmt[k] for k in ("teacher_map", "student_map") if k in mlmt})
    except FileNotFoundError:
        pass
    return vals


def collect(out, seeds):
    data = {"seeds": seeds, "rows": [], "runs": {}}
    values = {}
    for row, run, path, base, claim in ROWS:
        per_seed, per_class = [], {}
        for s in seeds:
            run_dir = os.path.join(out, "runs", f"{run}_seed{s}")
            try:
                with open(os.path.join(run_dir, "metrics.json")) as f:
                    m = json.load(f)
                v, iou = get(m, path), get(m, path[:-1] + ("iou",)) if path[-1] == "miou" else None
            except FileNotFoundError:
                v, iou = None, None
            per_seed.append(None if v is None else 100 * v)
            for c, x in (iou or {}).items():
                per_class.setdefault(c, []).append(100 * x)
        values[row] = per_seed
        entry = {"row": row, "run": run, "metric": ".".join(path), "command": command(run), "per_seed": per_seed,
                 "mean": mean(per_seed), "std": std(per_seed), "claim": claim, "baseline": base,
                 "per_class_iou_mean": {c: mean(xs) for c, xs in per_class.items()}}
        if base:
            gains = [None if a is None or b is None else a - b for a, b in zip(per_seed, values[base])]
            entry.update(gain_per_seed=gains, gain_mean=mean(gains), gain_std=std(gains),
                         seeds_with_gain=sum(1 for g in gains if g is not None and g > 0),
                         seeds_with_loss=sum(1 for g in gains if g is not None and g < 0))
        data["rows"].append(entry)
    for run in RUNS:
        data["runs"][run] = {}
        for s in seeds:
            run_dir = os.path.join(out, "runs", f"{run}_seed{s}")
            info = last_logged(run_dir)
            try:
                with open(os.path.join(run_dir, "wall_time.json")) as f:
                    info["wall_s"] = json.load(f)["seconds"]
            except FileNotFoundError:
                pass
            data["runs"][run][s] = info
    lo = mean(values["supervised, 1/8 (hung2018 baseline)"])
    hi = mean(values["supervised, all labels (hung2018 baseline)"])
    data["gap_all_minus_eighth"] = None if lo is None or hi is None else hi - lo
    closed = {}
    for e in data["rows"]:
        if e["baseline"] and "all labels" not in e["row"] and e["gain_mean"] is not None and data["gap_all_minus_eighth"]:
            closed[e["row"]] = e["gain_mean"] / data["gap_all_minus_eighth"]
    data["gap_closed_by_mean_gain"] = closed
    return data


def command(run):
    script, extra, _ = RUNS[run]
    return " ".join([f"python {script}.py --data synthetic --seed K"] + extra)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def fmt(x, signed=False):
    return "-" if x is None else (f"{x:+.1f}" if signed else f"{x:.1f}")


def markdown(data):
    seeds = data["seeds"]
    lines = [f"Seeds {', '.join(map(str, seeds))}; mIoU (%) on the 200 val images after each script's `synthetic` "
             f"preset; gain = paired difference to the row named as baseline, same seed.", "",
             "| row | command (K = seed) | per seed | mean ± std | paired gain per seed | mean gain ± std | "
             "seeds up / down | paper's claim |",
             "|---|---|---|---|---|---|---|---|"]
    for e in data["rows"]:
        ps = " / ".join(fmt(v) for v in e["per_seed"])
        ms = f"{fmt(e['mean'])} ± {fmt(e['std'])}"
        if e["baseline"]:
            gs = " / ".join(fmt(v, True) for v in e["gain_per_seed"])
            gm = f"{fmt(e['gain_mean'], True)} ± {fmt(e['gain_std'])}"
            ud = f"{e['seeds_with_gain']} / {e['seeds_with_loss']}"
        else:
            gs = gm = ud = ""
        metric = "" if e["metric"] == "miou" else f" (`{e['metric']}`)"
        lines.append(f"| {e['row']} | `{e['command']}`{metric} | {ps} | {ms} | {gs} | {gm} | {ud} | {e['claim']} |")
    gap = data["gap_all_minus_eighth"]
    lines += ["", f"Gap between supervised with all labels and at 1/8: {fmt(gap)} mIoU points. Share of it closed by "
              "each method's mean gain over its own baseline: " +
              "; ".join(f"{k}: {100 * v:.0f}%" for k, v in data["gap_closed_by_mean_gain"].items()) + "."]
    classes = next((list(e["per_class_iou_mean"]) for e in data["rows"] if e["per_class_iou_mean"]), [])
    lines += ["", "Per-class IoU (%), mean over the seeds:", "", "| row | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for e in data["rows"]:
        if e["per_class_iou_mean"]:
            lines.append(f"| {e['row']} | " + " | ".join(fmt(e["per_class_iou_mean"].get(c)) for c in classes) + " |")
    lines += ["", "Wall time per run and the last logged value of each discriminator / selection statistic (means over "
              "the seeds; every run's log is in `results/synthetic/runs/`):", "",
              "| run | wall time per run (s) | last logged values |", "|---|---|---|"]
    for run, per in data["runs"].items():
        walls = [per[s]["wall_s"] for s in per if "wall_s" in per[s]]
        cells = []
        for k in DIAGNOSTICS:
            vs = [per[s][k] for s in per if per[s].get(k) is not None]
            if vs:
                cells.append(f"{k} {statistics.fmean(vs):.3f}")
        wall = f"{min(walls):.0f}-{max(walls):.0f}" if walls else ""
        lines.append(f"| {run} | {wall} | {', '.join(cells)} |")
    return "\n".join(lines) + "\n"


def picture(data, path):
    """One bar (mean) per row, one dot per seed; baselines grey, methods blue."""
    rows = [e for e in data["rows"] if e["metric"] in ("miou", "fused.miou")]
    font = ImageFont.load_default()
    W, bar_h, gap, left = 900, 18, 10, 290
    H = 40 + len(rows) * (bar_h + gap) + 30
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    vals = [v for e in rows for v in e["per_seed"] if v is not None] or [0, 100]
    hi = max(100.0, max(vals))
    x = lambda v: left + (W - left - 20) * v / hi
    d.text((4, 4), "mIoU (%) on the synthetic miniature: bar = mean, dots = seeds (grey: baselines)", fill=(0, 0, 0),
           font=font)
    for t in range(0, int(hi) + 1, 10):
        d.line([x(t), 30, x(t), H - 25], fill=(230, 230, 230))
        d.text((x(t) - 6, H - 22), str(t), fill=(0, 0, 0), font=font)
    for k, e in enumerate(rows):
        y = 34 + k * (bar_h + gap)
        d.text((4, y + 4), e["row"][:46], fill=(0, 0, 0), font=font)
        col = (170, 170, 170) if not e["baseline"] else (70, 120, 200)
        if e["mean"] is not None:
            d.rectangle([left, y, x(e["mean"]), y + bar_h], fill=col)
            d.text((x(e["mean"]) + 4, y + 4), f"{e['mean']:.1f}", fill=(0, 0, 0), font=font)
        for j, v in enumerate(e["per_seed"]):
            if v is not None:
                cy = y + 3 + (j % 5) * 3
                d.ellipse([x(v) - 3, cy - 3, x(v) + 3, cy + 3], fill=(0, 0, 0))
    gains = [e for e in data["rows"] if e["baseline"] and e["metric"] in ("miou", "fused.miou")]
    gh = 40 + len(gains) * (bar_h + gap) + 30
    panel = Image.new("RGB", (W, gh), (255, 255, 255))
    d = ImageDraw.Draw(panel)
    gv = [abs(v) for e in gains for v in e["gain_per_seed"] if v is not None] or [1.0]
    span = max(5.0, math.ceil(max(gv)))
    zero = left + (W - left - 20) / 2
    gx = lambda v: zero + (W - left - 20) / 2 * v / span
    d.text((4, 4), "paired gain over the method's own baseline (mIoU points): bar = mean, dots = seeds",
           fill=(0, 0, 0), font=font)
    for t in range(-int(span), int(span) + 1):
        if t % max(1, int(span) // 5) == 0:
            d.line([gx(t), 30, gx(t), gh - 25], fill=(120, 120, 120) if t == 0 else (230, 230, 230))
            d.text((gx(t) - 6, gh - 22), f"{t:+d}" if t else "0", fill=(0, 0, 0), font=font)
    for k, e in enumerate(gains):
        y = 34 + k * (bar_h + gap)
        d.text((4, y + 4), e["row"][:46], fill=(0, 0, 0), font=font)
        if e["gain_mean"] is not None:
            a_, b_ = sorted((zero, gx(e["gain_mean"])))
            d.rectangle([a_, y, b_, y + bar_h], fill=(70, 120, 200) if e["gain_mean"] >= 0 else (200, 90, 70))
            d.text((max(zero, gx(e["gain_mean"])) + 4, y + 4), f"{e['gain_mean']:+.1f}", fill=(0, 0, 0), font=font)
        for j, v in enumerate(e["gain_per_seed"]):
            if v is not None:
                cy = y + 3 + (j % 5) * 3
                d.ellipse([gx(v) - 3, cy - 3, gx(v) + 3, cy + 3], fill=(0, 0, 0))
    both = Image.new("RGB", (W, H + gh), (255, 255, 255))
    both.paste(img, (0, 0))
    both.paste(panel, (0, H))
    both.save(path)


def splice_readme(md):
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    a, b = "<!-- synthetic-table:start (written by results/synthetic_table.py) -->", "<!-- synthetic-table:end -->"
    if a not in text or b not in text:
        print("README.md has no synthetic-table markers; not updated")
        return
    head, rest = text.split(a, 1)
    _, tail = rest.split(b, 1)
    with open(path, "w") as f:
        f.write(head + a + "\n" + md + b + tail)
    print("README.md updated")


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0-4; with --report-only the seeds with a run folder")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "synthetic"))
    p.add_argument("--report-only", action="store_true", help="only rebuild the table from the run folders")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's table")
    ARGS = p.parse_args()
    os.makedirs(ARGS.out, exist_ok=True)
    if ARGS.seeds is None:
        found = sorted({int(d.rsplit("_seed", 1)[1]) for d in os.listdir(os.path.join(ARGS.out, "runs"))
                        if "_seed" in d}) if os.path.isdir(os.path.join(ARGS.out, "runs")) else []
        ARGS.seeds = found if ARGS.report_only and found else [0, 1, 2, 3, 4]
    if not ARGS.report_only:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // ARGS.jobs)
        # seed-major order: a table cut short still has whole seeds
        todo = [(r, s) for s in ARGS.seeds for r in ARGS.runs]
        t0 = time.time()
        with ThreadPoolExecutor(ARGS.jobs) as pool:
            futures = [pool.submit(run_one, r, s, ARGS.out, threads) for r, s in todo]
            for k, fut in enumerate(as_completed(futures)):
                name, seed, how = fut.result()
                done = time.time() - t0
                eta = done / (k + 1) * (len(todo) - k - 1)
                print(f"[{k + 1}/{len(todo)}] {name} seed {seed}: {how} | elapsed {done / 60:.1f} min, "
                      f"ETA {eta / 60:.0f} min", flush=True)
        print(f"all runs done in {(time.time() - t0) / 60:.1f} min")
    data = collect(ARGS.out, ARGS.seeds)
    md = markdown(data)
    with open(os.path.join(ARGS.out, "synthetic_table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(ARGS.out, "synthetic_table.json"), "w") as f:
        json.dump(data, f, indent=1)
    picture(data, os.path.join(ARGS.out, "synthetic_table.png"))
    print(md)
    if not ARGS.no_readme and os.path.abspath(ARGS.out) == os.path.abspath(os.path.join(ROOT, "results", "synthetic")):
        splice_readme(md)


ARGS = None
if __name__ == "__main__":
    main()
