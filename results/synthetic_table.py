"""Regenerate the synthetic results table (issue 15; README, "Results on the synthetic miniature").

    python results/synthetic_table.py --jobs 2         # every run of seeds 0-4, then the table (145 min on 2 cores)
    python results/synthetic_table.py --report-only    # the table again from the committed logs (the seeds there)
    python results/synthetic_table.py --seeds 0 --jobs 1 --out /tmp/t   # one seed, elsewhere
    python results/synthetic_table.py --hypothesis3 --jobs 2            # the data measurements (hypothesis 3)
    python results/synthetic_table.py --probe RUN_DIR                   # calibration of a hung2018 synthetic run

Every method runs its script's `synthetic` preset (the one miniature protocol) with its paper's full method and with
the script's own supervised baseline (the same script with the method's terms switched off), on the same seeds; a
seed fixes the labeled split (the same 125 of 1,000 images in every script), the initialisation and the data order.
"Supervised, all labels" is hung2018's baseline with --labeled 1.0. Nothing is tuned here: the arguments below are
the scripts' defaults plus the switches that name the variant.

Each run leaves, in OUT/runs/<run>_seed<k>/: args.json, labeled.txt, log.jsonl, metrics.json, stdout.txt (the
printed log) and curves.png (predictions.png for seed 0); checkpoints are deleted. A run whose metrics.json exists
is not run again, so an interrupted table continues where it stopped. Then OUT/synthetic_table.{md,json,png} are
written and the markdown replaces the part of README.md between the two `synthetic-table` marker comments.

--hypothesis3 measures the data (README, hypothesis 3) on seed 100, which is not a table seed: hung2018 and
latent_classes, baseline and full method, with the same 125 labeled images and 875 or 3,875 unlabeled ones; the
calibration, confusion and T_semi selection of the hung2018 models on their unlabeled pool (`probe`); and the
data's make-up (`data_stats`). It writes OUT/hypothesis3/ (the runs, same files as above, plus probe.json),
OUT/hypothesis3.{md,json} and README.md's `hypothesis3` block. --probe does the probe for any finished hung2018
`--data synthetic` run folder that still has its last.pt.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import threading
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
    cmd = [sys.executable, f"{script}.py", "--data", "synthetic", "--seed", str(seed), "--out", run_dir] + extra
    if seed != 0:
        cmd += ["--num-pictures", "0"]
    return name, seed, execute(run_dir, cmd, threads)


def execute(run_dir, cmd, threads, keep_checkpoint=False):
    """Runs one script invocation into run_dir (skipped if its metrics.json exists); returns "kept" or the time."""
    if os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return "kept"
    if os.path.isdir(run_dir):                     # an unfinished run: start it again from scratch
        for f in os.listdir(run_dir):
            os.remove(os.path.join(run_dir, f))
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.txt"), "w") as log:
        log.write("$ " + shlex.join(cmd[1:]) + "\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"{os.path.basename(run_dir)} failed (exit {rc}); see {run_dir}/stdout.txt")
    with open(os.path.join(run_dir, "wall_time.json"), "w") as f:
        json.dump({"seconds": round(wall, 1), "threads": threads, "parallel_jobs": ARGS.jobs}, f)
    for f in os.listdir(run_dir):                 # no checkpoints in results/
        if (f.endswith(".pt") and not (keep_checkpoint and f == "last.pt")) or f.endswith(".pt.tmp"):
            os.remove(os.path.join(run_dir, f))
    return f"{wall:.0f} s"


def run_all(jobs_list, jobs):
    """Runs (label, function, arguments) items, `jobs` at a time, printing progress and an ETA."""
    t0, ran = time.time(), 0
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(fn, *a): label for label, fn, a in jobs_list}
        for k, fut in enumerate(as_completed(futures)):
            how = fut.result()
            how = how[-1] if isinstance(how, tuple) else how
            if how != "kept":
                ran += 1
            done = time.time() - t0
            left = len(jobs_list) - k - 1
            eta = f"ETA {done / ran * left / 60:.0f} min" if ran else "ETA n/a"   # kept runs cost nothing
            print(f"[{k + 1}/{len(jobs_list)}] {futures[fut]}: {how} | elapsed {done / 60:.1f} min, {eta}",
                  flush=True)
    print(f"all runs done in {(time.time() - t0) / 60:.1f} min")


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


def splice_readme(md, tag="synthetic-table"):
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    a, b = f"<!-- {tag}:start (written by results/synthetic_table.py) -->", f"<!-- {tag}:end -->"
    if a not in text or b not in text:
        print(f"README.md has no {tag} markers; not updated")
        return
    head, rest = text.split(a, 1)
    _, tail = rest.split(b, 1)
    with open(path, "w") as f:
        f.write(head + a + "\n" + md + b + tail)
    print(f"README.md updated ({tag})")


# ----------------------------------------------------------------------------------------------------------------
# Hypothesis 3 (issue 15; README, hypothesis 3, "The data itself"): on seed 100, never a table seed.
#  - the data's make-up, from the labels;
#  - the unlabeled pool: hung2018 and latent_classes, baseline and full method, with the same 125 labeled images and
#    875 or 3,875 unlabeled ones (the generator draws images in order, so the first 1,000 are the table's images;
#    the 200 val images are the next 200, so each pool size has its own val set and only the paired gain compares);
#  - calibration and confusion of hung2018's 1/8 models on their unlabeled pool: which errors a selection by
#    confidence or by D could remove at all.
# ----------------------------------------------------------------------------------------------------------------
H3_SEED, H3_POOLS, H3_RUNS = 100, (1000, 4000), ("hung_sup", "hung_full", "latent_sup", "latent_full")


def h3_dir(out, name, train):
    return os.path.join(out, "hypothesis3", f"{name}_train{train}_seed{H3_SEED}")


def h3_run(name, train, out, threads, split):
    script, extra, _ = RUNS[name]
    # the scripts read their module-level SYNTHETIC_SIZE when they build the data; 1,000 is their default
    code = f"import sys, {script}; {script}.SYNTHETIC_SIZE['num_train'] = {train}; {script}.main(sys.argv[1:])"
    run_dir = h3_dir(out, name, train)
    cmd = [sys.executable, "-c", code, "--data", "synthetic", "--seed", str(H3_SEED), "--split", split,
           "--out", run_dir, "--num-pictures", "0"] + extra
    path = os.path.join(run_dir, "probe.json")
    if name.startswith("hung") and not os.path.isfile(path) and not os.path.isfile(os.path.join(run_dir, "last.pt")) \
            and os.path.isfile(os.path.join(run_dir, "metrics.json")):
        os.remove(os.path.join(run_dir, "metrics.json"))          # finished but not probed: nothing to probe, redo it
    wall = execute(run_dir, cmd, threads, keep_checkpoint=name.startswith("hung"))
    with open(os.path.join(run_dir, "synthetic_size.json"), "w") as f:   # for --probe: args.json does not say it
        json.dump({"num_train": train}, f)
    if name.startswith("hung"):                  # probed, then the checkpoint goes
        if not os.path.isfile(path):
            with PROBE_LOCK:                     # in this process: one probe at a time, on this job's threads
                result = probe(run_dir, train, threads)
            with open(path + ".tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(path + ".tmp", path)
        ckpt = os.path.join(run_dir, "last.pt")
        if os.path.isfile(ckpt):
            os.remove(ckpt)
    return wall


PROBE_LOCK = threading.Lock()


def probe(run_dir, train=None, threads=None):
    """Confusion and calibration of a finished hung2018 run (its last.pt) on its unlabeled pool and on val, and, for a
    run with L_semi, the share and accuracy of the pixels that T_semi keeps (sigmoid(D) >= T_semi). Every count is
    over the pixels that are not ignore (255), on whole images in eval mode; the training log's semi_kept counts every
    pixel of a training batch, the ignore band included. `train`: the run's number of train images (default: its
    synthetic_size.json, else the scripts' 1,000)."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, ROOT)
    import common
    import hung2018 as H
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            args = argparse.Namespace(**json.load(f))
    except FileNotFoundError:
        sys.exit(f"{run_dir}: no args.json; not a run folder")
    if getattr(args, "data", None) != "synthetic" or not hasattr(args, "t_semi") or \
            not os.path.isfile(os.path.join(run_dir, "last.pt")):
        sys.exit(f"{run_dir}: not a finished hung2018 --data synthetic run folder with its last.pt")
    if train is None:
        try:
            with open(os.path.join(run_dir, "synthetic_size.json")) as f:
                train = json.load(f)["num_train"]
        except FileNotFoundError:
            train = H.SYNTHETIC_SIZE["num_train"]
    if threads:
        torch.set_num_threads(threads)
    source = common.make_source("synthetic", **dict(H.SYNTHETIC_SIZE, num_train=train))
    with open(os.path.join(run_dir, "labeled.txt")) as f:
        labeled = set(f.read().split())
    C = source.NUM_CLASSES
    model = H.DeepLabV2(C, args.backbone, args.aspp_rates, args.aspp_branches, stride_in_3x3=args.init == "imagenet",
                        width=args.width)
    D = H.FCDiscriminator(C, args.ndf, fcd=not args.no_fcd, layers=args.d_layers)
    state = torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state["model"])
        D.load_state_dict(state["D"])
    except (KeyError, RuntimeError) as e:
        sys.exit(f"{run_dir}: last.pt does not fit hung2018's network of args.json ({str(e).splitlines()[0]})")
    model.to(memory_format=torch.channels_last).eval()     # as the script evaluates it: the same float sums
    D.to(memory_format=torch.channels_last).eval()
    normalize = (common.Normalize("caffe", bgr=not args.rgb_input) if args.init == "coco"       # as build_data
                 else common.Normalize("imagenet"))
    tf = common.EvalTransform(normalize, args.eval_pad, args.resize, args.eval_full_res)
    result = {}
    for part, ids in (("unlabeled", [i for i in source.splits["train"] if i not in labeled]),
                      ("val", source.splits["val"])):
        if not ids:                                  # a --labeled 1.0 run has no unlabeled pool
            continue
        cm = torch.zeros(C * C, dtype=torch.long)
        f64 = dict(dtype=torch.float64)                          # exact pixel counts
        n_bin, ok_bin = torch.zeros(10, **f64), torch.zeros(10, **f64)      # max-softmax deciles
        n_keep, ok_keep = torch.zeros(2, **f64), torch.zeros(2, **f64)     # T_semi dropped / kept
        with torch.no_grad():
            for x, y, _ in common.EvalLoader(common.SegDataset(source, ids, tf), 50):
                p = F.softmax(H.up(model(x).float(), y.shape[-2:]), 1)
                conf, pred = p.max(1)
                keep = torch.sigmoid(H.up(D(p), y.shape[-2:]))[:, 0] >= args.t_semi
                v = y != common.IGNORE
                y, pred, conf, keep = y[v].long(), pred[v], conf[v], keep[v].long()
                ok = (pred == y).double()
                cm += torch.bincount(y * C + pred, minlength=C * C)
                b = (conf * 10).long().clamp(max=9)
                n_bin.index_add_(0, b, torch.ones_like(ok))
                ok_bin.index_add_(0, b, ok)
                n_keep.index_add_(0, keep, torch.ones_like(ok))
                ok_keep.index_add_(0, keep, ok)
        m = cm.view(C, C).double()
        tp = m.diag()
        err = float(n_bin.sum() - ok_bin.sum())
        r = {"images": len(ids), "pixel_acc": float(tp.sum() / m.sum()),
             "miou": float((tp / (m.sum(0) + m.sum(1) - tp)).nanmean()),     # as common.ConfusionMatrix
             "share_conf_ge_0.9": float(n_bin[9] / n_bin.sum()),
             "acc_conf_ge_0.9": float(ok_bin[9] / n_bin[9]) if n_bin[9] else None,
             "errors_at_conf_ge_0.9": float(n_bin[9] - ok_bin[9]) / err if err else None,
             "acc_by_decile": [None if n == 0 else round(float(o / n), 4) for o, n in zip(ok_bin, n_bin)],
             "share_by_decile": [round(float(n / n_bin.sum()), 4) for n in n_bin],
             "confusion_rows": [[round(float(v), 4) for v in row] for row in m / m.sum(1, keepdim=True)]}
        if args.lambda_semi > 0:
            r.update(semi_kept=float(n_keep[1] / n_keep.sum()),
                     acc_kept=float(ok_keep[1] / n_keep[1]) if n_keep[1] else None,
                     acc_dropped=float(ok_keep[0] / n_keep[0]) if n_keep[0] else None)
        result[part] = r
    return result


def data_stats(train=1000):
    """The miniature's make-up, from its train labels: pixel share per class and of the ignore band, classes per
    image, and the labeled area of one object class in an image where it appears."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import common
    import hung2018 as H
    source = common.make_source("synthetic", **dict(H.SYNTHETIC_SIZE, num_train=train))
    labs = np.stack([source.read_label(i) for i in source.splits["train"]])
    C, n = source.NUM_CLASSES, labs[0].size
    counts = np.stack([(labs == c).reshape(len(labs), -1).sum(1) for c in range(C)], 1)       # (images, C)
    present = counts[:, 1:] > 0
    return {"images": len(labs), "pixels_per_image": int(n),
            "pixel_share": {name: float((labs == c).mean()) for c, name in enumerate(source.CLASSES)},
            "ignore_share": float((labs == common.IGNORE).mean()),
            "object_classes_per_image": float(present.sum(1).mean()),
            "images_per_class": {name: int(present[:, c - 1].sum()) for c, name in enumerate(source.CLASSES) if c},
            "class_area_share_where_present": float(counts[:, 1:][present].mean() / n)}


def h3_markdown(res):
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    lines = [f"Seed {H3_SEED} (not a table seed); the same 125 labeled images in every run; "
             "`python results/synthetic_table.py --hypothesis3`.", "",
             "| train images | unlabeled | hung2018 baseline | hung2018 full | gain | latent_classes baseline | "
             "latent classes | gain |", "|---|---|---|---|---|---|---|---|"]
    for train in H3_POOLS:
        r = res["runs"][str(train)]
        g = lambda a, b: "-" if r.get(a) is None or r.get(b) is None else f"{100 * (r[b] - r[a]):+.1f}"
        lines.append(f"| {train} | {r.get('unlabeled', '-')} | {pct(r.get('hung_sup'))} | {pct(r.get('hung_full'))} | "
                     f"{g('hung_sup', 'hung_full')} | {pct(r.get('latent_sup'))} | {pct(r.get('latent_full'))} | "
                     f"{g('latent_sup', 'latent_full')} |")
    lines += ["", "hung2018's models on their unlabeled pool (val in brackets): pixel accuracy, the share of pixels "
              "predicted with max softmax >= 0.9, their accuracy, and the share of all errors made at that confidence; "
              "for the full method, the share T_semi keeps and the accuracy of kept and dropped pixels (all over the "
              "pixels that are not ignore, whole images, eval mode; the training log's semi_kept also counts the "
              "ignore band):", "",
              "| run | pixel acc | conf >= 0.9 | acc there | errors at conf >= 0.9 | kept by T_semi | acc kept | "
              "acc dropped |", "|---|---|---|---|---|---|---|---|"]
    for train in H3_POOLS:
        for name in ("hung_sup", "hung_full"):
            pr = res["probes"].get(f"{name}_train{train}")
            if not pr:
                continue
            u, v = pr["unlabeled"], pr["val"]
            cell = lambda k: f"{pct(u.get(k))} ({pct(v.get(k))})" if k in u else "-"
            lines.append(f"| {name}, {train} train | {cell('pixel_acc')} | {cell('share_conf_ge_0.9')} | "
                         f"{cell('acc_conf_ge_0.9')} | {cell('errors_at_conf_ge_0.9')} | {cell('semi_kept')} | "
                         f"{cell('acc_kept')} | {cell('acc_dropped')} |")
    pr = res["probes"].get(f"hung_sup_train{H3_POOLS[0]}")
    if pr:
        names = res["classes"]
        lines += ["", f"Confusion of hung2018's baseline ({H3_POOLS[0]} train images) on its unlabeled pool, % of each "
                  "true class's pixels (rows: truth, columns: prediction):", "",
                  "| truth | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for name, row in zip(names, pr["unlabeled"]["confusion_rows"]):
            lines.append(f"| {name} | " + " | ".join(f"{100 * x:.1f}" for x in row) + " |")
    d = res["data"]
    lines += ["", f"The data ({d['images']} train images of {d['pixels_per_image']} pixels): pixel share " +
              ", ".join(f"{k} {100 * v:.1f}%" for k, v in d["pixel_share"].items()) +
              f", ignore band {100 * d['ignore_share']:.1f}%; {d['object_classes_per_image']:.2f} object classes per "
              f"image; a class covers {100 * d['class_area_share_where_present']:.1f}% of an image where it appears; "
              "images per class: " + ", ".join(f"{k} {v}" for k, v in d["images_per_class"].items()) + "."]
    return "\n".join(lines) + "\n"


def hypothesis3(out, jobs):
    sys.path.insert(0, ROOT)
    import common
    import hung2018 as H
    os.makedirs(os.path.join(out, "hypothesis3"), exist_ok=True)
    # the split a seed-100 run of the table's protocol draws, written once and given to every run
    split = os.path.join(out, "hypothesis3", f"labeled_seed{H3_SEED}.txt")
    if not os.path.isfile(split):
        source = common.make_source("synthetic", **H.SYNTHETIC_SIZE)
        common.write_list(split, common.labeled_split(source.splits["train"], 0.125, H3_SEED)[0])
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
                  // jobs)
    run_all([(f"{n} train {t}", h3_run, (n, t, out, threads, split)) for t in H3_POOLS for n in H3_RUNS], jobs)
    res = {"seed": H3_SEED, "split": os.path.relpath(split, ROOT), "runs": {}, "probes": {},
           "classes": list(common.SyntheticSource.CLASSES), "data": data_stats()}
    for t in H3_POOLS:
        row = res["runs"].setdefault(str(t), {})
        for n in H3_RUNS:
            with open(os.path.join(h3_dir(out, n, t), "metrics.json")) as f:
                m = json.load(f)
            row[n], row["unlabeled"] = m["miou"], m["unlabeled"]
            if n.startswith("hung"):
                with open(os.path.join(h3_dir(out, n, t), "probe.json")) as f:
                    res["probes"][f"{n}_train{t}"] = json.load(f)
    md = h3_markdown(res)
    with open(os.path.join(out, "hypothesis3.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "hypothesis3.md"), "w") as f:
        f.write(md)
    print(md)
    return md


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0-4; with --report-only the seeds with a run folder")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "synthetic"))
    p.add_argument("--report-only", action="store_true", help="only rebuild the table from the run folders")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's table")
    p.add_argument("--hypothesis3", action="store_true",
                   help="instead of the table: the data measurements of hypothesis 3 on seed 100 (about 30 min, "
                        "2 cores, --jobs 2); OUT/hypothesis3.{md,json} and README's hypothesis3 block")
    p.add_argument("--probe", nargs="+", metavar="RUN_DIR",
                   help="instead of the table: calibration, confusion and T_semi selection of finished hung2018 "
                        "--data synthetic run folders (with their last.pt), on their unlabeled pool and on val; "
                        "writes RUN_DIR/probe.json")
    ARGS = p.parse_args()
    if ARGS.probe:
        for run_dir in ARGS.probe:
            r = probe(run_dir)
            with open(os.path.join(run_dir, "probe.json"), "w") as f:
                json.dump(r, f, indent=1)
            for part, v in r.items():
                print(f"{run_dir} {part}: " + ", ".join(f"{k} {v[k]:.4f}" for k in
                      ("pixel_acc", "miou", "share_conf_ge_0.9", "acc_conf_ge_0.9", "errors_at_conf_ge_0.9",
                       "semi_kept", "acc_kept", "acc_dropped") if v.get(k) is not None))
        return
    os.makedirs(ARGS.out, exist_ok=True)
    if ARGS.hypothesis3:
        md = hypothesis3(ARGS.out, ARGS.jobs)
        if not ARGS.no_readme and os.path.abspath(ARGS.out) == os.path.abspath(os.path.join(ROOT, "results",
                                                                                             "synthetic")):
            splice_readme(md, "hypothesis3")
        return
    if ARGS.seeds is None:
        found = sorted({int(d.rsplit("_seed", 1)[1]) for d in os.listdir(os.path.join(ARGS.out, "runs"))
                        if "_seed" in d}) if os.path.isdir(os.path.join(ARGS.out, "runs")) else []
        ARGS.seeds = found if ARGS.report_only and found else [0, 1, 2, 3, 4]
    if not ARGS.report_only:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // ARGS.jobs)
        # seed-major order: a table cut short still has whole seeds
        run_all([(f"{r} seed {s}", run_one, (r, s, ARGS.out, threads)) for s in ARGS.seeds for r in ARGS.runs],
                ARGS.jobs)
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
