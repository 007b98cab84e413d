"""Mittal, Tatarchenko, Brox, "Semi-Supervised Semantic Segmentation with High- and Low-level Consistency",
IEEE TPAMI 2019 (arXiv 1908.05724): s4GAN + MLMT.

Idea. Two branches, trained separately and joined at test time. s4GAN (low level): a DeepLab-v2 segmenter S and an
image-level discriminator D that sees a class-probability map concatenated with its image. S learns from labeled
pixels, from matching D's pooled features of ground truth and of its own unlabeled predictions, and from its own
argmax on the unlabeled images that D scores above gamma (self-training). MLMT (high level): a multi-label mean
teacher classifier; at test time it switches off the class channels of S that it thinks are absent from the image.

Losses (means over what counts, as in the released code; method card ../shared/methods/s4gan_mlmt.md, sec. 3):
    Eq. (1)  L_ce  = cross-entropy(S(x_l), y_l) over pixels with y != 255
    Eq. (2)  L_fm  = mean_k | mean_i D_k(onehot(y_g) + x_g) - mean_j D_k(softmax S(x_u) + x_u) |   (+ = concatenation)
    Eq. (3)  L_st  = cross-entropy(S(x_u), argmax S(x_u)) over the unlabeled images with D(S(x_u) + x_u) >= gamma
    Eq. (4)  L_S   = L_ce + lambda_fm L_fm + lambda_st L_st          lambda_fm = 0.1, lambda_st = 1, gamma = 0.6 (Sec. 4.1.3)
    Eq. (5)  L_D   = BCE(D(onehot(y_g) + x_g), 1) and BCE(D(S(x_u) + x_u), 0), each averaged, weighted 1/2
    Eq. (6)  L_MT  = BCE(sigmoid G(x_l), z_l) + lambda_cons w(epoch) mean (sigmoid G(x) - sigmoid H(x'))^2, H = EMA of G
    Eq. (7)  S(x)_c = 0 where the MLMT teacher's probability of class c is below tau = 0.2 (softmax of S, then argmax)

Reproduce Table 1's VOC 1/8 row (ImageNet initialisation; s4GAN 65.4, s4GAN + MLMT 67.3):
    python s4gan_mlmt.py --data voc --data-root DATA/VOC --labeled 0.125
Ablations: Table 6 CE only `--lambda-fm 0 --lambda-st 0`, CE + SGAN `--lambda-fm 0 --lambda-st 0 --lambda-gan 0.1`,
CE + FM `--lambda-st 0`; Table 5 "MLMT only" = CE only with its default fused evaluation. `--stage s4gan|mlmt`.

Deviations and choices (paper / released code sud0301/semisup-semseg / this script; `--official-quirks` = all quirks):
 1. Losses are means (paper: sums); L_D halves the sum of its two means (code). The lambdas were tuned on the means.
 2. ASPP: DeepLab-v2 sums four branches; the code returns inside the loop (rates 6+12). Default 4, `--aspp-branches 2`.
    Its weights N(0, 0.01), its biases PyTorch's default initialisation (code; paper silent).
 3. Backbone parameters listed 3-4 times in SGD by the code. Default once, quirk `--official-optimizer` (3-4 momentum
    sub-steps, with PyTorch 0.4's weight decay added into p.grad in place, so it accumulates over them). The code ran
    float32: quirk `--no-amp` (TF32 off too; `--amp` keeps bf16 under the quirks). Quirk flags have a `--no-` form.
 4. The 10x learning rate of the ASPP head is the code's (paper silent): kept.
 5. Input: torchvision ImageNet weights get ImageNet-normalised RGB and torchvision's stride placement (methods/README).
    The code feeds VOC as RGB 0-255 minus the Caffe mean, Cityscapes as BGR/255 minus its mean, Context with a reversed
    mean in training, and puts the stride in the first 1x1 conv: quirks `--official-input`, `--stride-in-1x1`.
 6. Augmentation (VOC, Context): random scale {0.5..1.6} + crop 321 + flip (paper Sec. 4.1.1, "Context the same as
    VOC"). Code: VOC neither scale nor flip (`--no-random-scale --no-random-mirror`); Context short side U[252, 1010]
    and blur p 0.5 (`--official-context-aug`; blurred before the crop here, after it there). Padded label pixels
    are ignored (255); the code's Context loader labels them background 0, which its own augmentation makes rare
    (it pads only when the short side is under 321), so 0 comes only with `--official-context-aug` (with the scaling
    0.5-1.6 far more crops are padded). Padded image pixels are the mean colour (code: black). Resampling (paper
    silent) as each released loader, `--resample`: VOC cv2.resize (bilinear 2x2 taps without antialiasing, nearest
    = floor(x * src/dst)), reproduced without OpenCV; Context and Cityscapes PIL (antialiased bilinear).
 7. D dropout: paper p 0.5 after each of the 4 convs; code Dropout2d after conv1-3 only (`--official-dropout`).
 8. L_fm's norm (paper unspecified): mean absolute difference over the 512 pooled features (code). D's image input is
    min-max normalised over the whole batch tensor (code; each batch by its own range: the code's real side takes
    the CE batch's range, a bug fixed here without a flag).
 9. L_st: hard argmax labels on every pixel, no ignore; none at iteration 0 (code); ">= gamma" (paper; code ">",
    which differs only for a score of exactly gamma: no flag).
10. MLMT classification term: sigmoid + BCE (the paper's "categorical CE"; its 2019 README says sigmoid + BCE).
11. MLMT consistency: paper MSE on labeled and unlabeled images (default, on sigmoid outputs); code cosine distance
    of logits on unlabeled images only (`--cons cosine`). Weight w: 0 for the first 10 epochs (`--burn-in`), then
    min(1, (e - 10) * 2 / --mlmt-epochs), 1 from epoch 60 of 100 (code; paper silent), times lambda_cons (the code
    clamps at lambda_cons instead: the same for the paper's 1.0). Views: weak (resize 320 + flip) to the teacher,
    strong (+ colour jitter 0.4/0.4/0.4/0.1, blur sigma U(0.1, 2)) to the student (code). Teacher built separately,
    its BN statistics its own (code).
12. Fusion: paper zeroes the class's "segmentation map" where G <= tau: softmax probabilities masked (default); code
    masks logits and keeps G >= tau (`--fuse-logits`), where a dropped class can still win. Eq. (7) names "the soft
    output of the MLMT-branch", the student G; we fuse the teacher's scores, as the released README's fusion does
    (`--fuse-with student` for the student's).
13. Iterations: paper 35K VOC/Cityscapes, 50K Context; code 40K (`--official-quirks` sets 40K with `--eval-every 5000`,
    which logs val mIoU at 30K, the released README's snapshot, fused too when an MLMT run is given with
    `--stage s4gan --mlmt-scores`). Cityscapes batch: paper 5, code 8 (quirk).
14. MLMT class vectors are built from the masks in segmentation order (background 0; the code's np.roll bug not kept).
    On PASCAL-Context, where no MLMT code was released, the VOC recipe is reused with 60-d vectors.
15. Evaluation as the code: VOC padded to 505, Context the central 512 x 512, Cityscapes at 512x1024; standard mIoU
    (the code divides by C since 2020; the same on these val sets). Splits: seeded id lists (`--split FILE` reuses
    one; the code's unseeded permutations are pickles, never read here). The CE-only baseline uses batch 8 (code: 10).
16. The `synthetic` preset is not the paper's setting: ResNet-18 DeepLab at width 32, ASPP rates 1-4, Adam 5e-4 (no
    10x head); D at width 16 with 2 convs (`--d-layers`: the paper's 4 see 46 px of the 321 px crop, 14%; 2 see 10 px
    of the 80 px images, 12.5%); a small MLMT (see PRESETS). Both networks start from themselves pretrained on other
    generated shapes (`--init synthetic`, `--mlmt-init synthetic`: common.synthetic_pretrained, built once and cached,
    the miniature's stand-in for ImageNet), so that both stages and the fused evaluation run on a laptop CPU.
"""
import argparse
import csv
import datetime
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

import common
from common import IGNORE, DataError

# ================================================================================================================
# Arguments. Defaults are the paper's (Sec. 4.1); `PRESETS` holds what differs per dataset.
# ================================================================================================================
COCO_URL = "http://vllab1.ucmerced.edu/~whung/adv-semi-seg/resnet101COCO-41f33a49.pth"   # Table 1 "+ COCO" rows
PAPER = dict(
    backbone="resnet101", width=64, init="imagenet", aspp_rates=(6, 12, 18, 24),  # Sec. 4.1.2; card 4.1-4.2
    num_steps=35000, batch_size=8, crop_size=(321, 321), resize=None,            # Sec. 4.1.3; Sec. 4.1.1
    random_scale=True, random_mirror=True, official_context_aug=False,           # Sec. 4.1.1 (deviation 6)
    resample="cv2",                                                              # VOC loader's cv2.resize (dev. 6)
    optimizer="sgd", lr=2.5e-4, head_lr_mult=10, momentum=0.9, weight_decay=5e-4, nesterov=False,   # Sec. 4.1.3
    lr_d=1e-4, power=0.9, ndf=64, d_layers=4,                                    # Sec. 4.1.3 (Adam 0.9/0.99); card 4.3
    lambda_fm=0.1, lambda_st=1.0, lambda_gan=0.0, gamma=0.6,                     # Sec. 4.1.3; Table 6 SGAN
    aspp_branches=4, official_optimizer=False, official_input=False, stride_in_1x1=False, official_dropout=False,
    no_amp=False,                                                                # deviation 3
    tau=0.2, fuse_logits=False, fuse_with="teacher",                             # Eq. (7), Sec. 4.1.3 (dev. 12)
    # MLMT (Sec. 3.2, 4.1.2; the rest from the released train_mlmt.py, card 5.3 / 6)
    mlmt_backbone="resnet101", mlmt_init="imagenet", mlmt_size=320, mlmt_epochs=100, mlmt_batch_size=16,
    mlmt_batch_size_unl=80, mlmt_lr=3e-2, mlmt_lr_min=1e-4, mlmt_weight_decay=1e-5, lambda_cons=1.0,
    cons="mse", burn_in=10, ema_decay=0.999, mlmt_eval_every=5,
    stage="both", eval_pad=(505, 505), eval_short_side=None, eval_batch_size=4,
    save_every=1000, eval_every=0, log_every=20)
PRESETS = {
    "voc": {},
    # Sec. 4.1.1 "the same as for VOC", 50K iterations (Sec. 4.1.3); evaluation on the central 512x512 after resizing
    # the short side to 512, resampled with PIL as the released Context loader (card 7.2 / 7.5)
    "context": dict(num_steps=50000, eval_pad=None, eval_short_side=512, resample="pil"),
    # Sec. 4.1.1: half resolution, crops 256x512, flips; Sec. 4.1.3: batch 5, gamma 0.7, D lr 1e-5; MLMT not used;
    # resized with PIL as the released loader (scipy.misc.imresize, card 7.3)
    "cityscapes": dict(batch_size=5, crop_size=(256, 512), resize=(512, 1024), random_scale=False, gamma=0.7,
                       lr_d=1e-5, stage="s4gan", eval_pad=None, eval_batch_size=2, resample="pil"),
    # Not the paper's (deviation 16): the segmenter of hung2018's synthetic preset (README, "Datasets", Synthetic:
    # Adam 5e-4, ASPP rates 1-4 for 11x11 logits), pretrained on other generated shapes (--init synthetic); D at 1/4
    # width with 2 convs, the paper's receptive field / crop ratio (Discriminator); 1,000 iterations; MLMT: a one-
    # block-per-stage torchvision ResNet ("resnet10") on the 80 px images, pretrained on the same other shapes
    # (--mlmt-init synthetic), 20 epochs of the 125 labeled images (burn-in 2, ramp over epochs 3-12), unlabeled
    # batch 32, lr 0.03 (README, "The synthetic miniature").
    "synthetic": dict(backbone="resnet18", width=32, init="synthetic", aspp_rates=(1, 2, 3, 4), num_steps=1000,
                      batch_size=8, crop_size=None, random_scale=False, random_mirror=True, optimizer="adam",
                      lr=5e-4, head_lr_mult=1, ndf=16, d_layers=2, eval_pad=None, eval_batch_size=50, save_every=400,
                      log_every=100, mlmt_backbone="resnet10", mlmt_init="synthetic", mlmt_size=80, mlmt_epochs=20,
                      mlmt_batch_size_unl=32, burn_in=2, mlmt_eval_every=10),
}
# Behaviour of the released code that differs from the defaults (methods/README rule 2); see the docstring.
OFFICIAL_QUIRKS = dict(aspp_branches=2, official_optimizer=True, official_input=True, stride_in_1x1=True,
                       official_dropout=True, fuse_logits=True, cons="cosine", num_steps=40000, eval_every=5000,
                       no_amp=True)
OFFICIAL_QUIRKS_DATA = {"voc": dict(random_scale=False, random_mirror=False), "context": dict(official_context_aug=True),
                        "cityscapes": dict(batch_size=8), "synthetic": dict(num_steps=None, eval_every=None)}
SYNTHETIC_SIZE = dict(size=80, num_train=1000, num_val=200)
# Generated data at the paper's image size and class count (common.SyntheticSceneSource), trained with the paper's
# own preset: measures speed and memory at the paper's configuration with nothing to download (README, "Throughput").
PRESETS.update({"synthetic-voc": PRESETS["voc"], "synthetic-cityscapes": PRESETS["cityscapes"]})
OFFICIAL_QUIRKS_DATA.update({"synthetic-voc": OFFICIAL_QUIRKS_DATA["voc"],
                             "synthetic-cityscapes": OFFICIAL_QUIRKS_DATA["cityscapes"]})


class Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line, no usage dump
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def get_parser():
    p = Parser(description="Mittal et al. 2019: s4GAN + multi-label mean teacher for semi-supervised segmentation")
    a = p.add_argument
    a("--data", required=True, help="voc | context | cityscapes | synthetic | synthetic-voc | synthetic-cityscapes")
    a("--data-root", help="dataset folder (README, 'Datasets'); not needed for synthetic")
    a("--download", action="store_true", help="download VOC 2012 with torchvision first (SBD labels: see README)")
    a("--labeled", type=float, default=0.125, help="fraction of the train set that is labeled, in (0, 1]")
    a("--split", help="file of labeled ids (one per line) to reuse instead of drawing one")
    a("--seed", type=int, default=0, help="seed for the split, the initialisation and the data order")
    a("--out", help="run folder (default runs/s4gan_mlmt_<data>_<labeled>_seed<seed>_<time>)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (its own arguments are used)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=int, help="data loader processes per image stream (default: 0 on CPU; on CUDA the CPUs this "
                                  "process may use, less one, shared over the 3 image streams: common.default_workers)")
    a("--no-amp", action="store_true", default=None, help="float32 on CUDA (TF32 off too) instead of bf16 autocast")
    a("--compile", action="store_true", help="torch.compile the segmenter and the discriminator(s); partial "
      "batches are dropped (README, 'Throughput')")
    a("--stage", choices=["both", "s4gan", "mlmt"],
      help="both: s4GAN, then MLMT, then the fused evaluation (default; Cityscapes: s4gan, as in the paper)")
    a("--mlmt-scores", help="fuse with the MLMT val scores of another run (its mlmt_val_scores.csv)")
    # network and initialisation
    a("--backbone", choices=sorted(BACKBONES), help="paper: resnet101 (smaller ones for quick runs)")
    a("--width", type=int, help="channels of the stem (64 in every torchvision ResNet; synthetic preset: 32)")
    a("--init", choices=["imagenet", "coco", "synthetic", "none"],
      help="imagenet: torchvision weights (paper's main rows); coco: COCO-pretrained DeepLab-v2 (Table 1 '+ COCO'); "
           "synthetic: this network pretrained on other generated shapes, the miniature's stand-in (built once, "
           "cached); none: random")
    a("--restore-from", help=f"path or URL of the DeepLab-v2 (COCO) weights for --init coco (default: {COCO_URL})")
    a("--aspp-rates", type=int, nargs=4, help="ASPP dilation rates (DeepLab-v2: 6 12 18 24)")
    a("--aspp-branches", type=int, choices=[2, 4], help="4: DeepLab-v2; 2: released code's bug (quirk)")
    a("--freeze-bn-stats", action="store_true", help="BN in eval mode during training (default: batch statistics)")
    a("--ndf", type=int, help="D width, channels of its first conv (Sec. 4.1.2: 64)")
    a("--d-layers", type=int, choices=range(2, 7), metavar="{2..6}",
      help="stride-2 convs of D before its pooling (Sec. 4.1.2: 4; synthetic preset: 2, the paper's receptive field "
           "/ crop ratio)")
    # optimisation (Sec. 4.1.3)
    a("--num-steps", type=int, help="iterations (Sec. 4.1.3: 35000 VOC and Cityscapes, 50000 Context)")
    a("--batch-size", type=int, help="images per batch, each of labeled / unlabeled / D's real (Sec. 4.1.3: 8; CS 5)")
    a("--crop-size", type=int, nargs=2, help="training crop H W (PASCAL 321 321, Cityscapes 256 512)")
    a("--random-scale", action=argparse.BooleanOptionalAction, default=None, help="scale by 0.5..1.6 (Sec. 4.1.1)")
    a("--random-mirror", action=argparse.BooleanOptionalAction, default=None, help="horizontal flips (Sec. 4.1.1)")
    a("--resample", choices=common.RESAMPLE,
      help="image/label resizing (paper silent): cv2 = OpenCV's INTER_LINEAR/NEAREST as the released VOC loader "
           "(default); pil = PIL, antialiased when shrinking, as the released Context and Cityscapes loaders")
    a("--optimizer", choices=["sgd", "adam"], help="optimizer of S (Sec. 4.1.3: SGD; synthetic preset: Adam)")
    a("--lr", type=float, help="S learning rate (Sec. 4.1.3: 2.5e-4)")
    a("--head-lr-mult", type=float, help="learning-rate factor of the ASPP head (released code: 10)")
    a("--lr-d", type=float, help="D learning rate, Adam (Sec. 4.1.3: 1e-4; Cityscapes 1e-5)")
    a("--power", type=float, help="poly decay power (Sec. 4.1.3: 0.9)")
    a("--momentum", type=float, help="SGD momentum (Sec. 4.1.3: 0.9)")
    a("--weight-decay", type=float, help="SGD weight decay (Sec. 4.1.3: 5e-4)")
    a("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum (paper: no)")
    # method (Sec. 3, 4.1.3)
    a("--lambda-fm", type=float, help="lambda_fm, feature matching (Sec. 4.1.3: 0.1)")
    a("--lambda-st", type=float, help="lambda_st, self-training (Sec. 4.1.3: 1.0)")
    a("--lambda-gan", type=float, help="weight of the standard GAN loss of Table 6's 'CE + SGAN' (not given: 0.1)")
    a("--gamma", type=float, help="gamma, threshold on D's score for self-training (Sec. 4.1.3: 0.6; Cityscapes 0.7)")
    a("--tau", type=float, help="tau, MLMT threshold of the fusion, Eq. (7) (Sec. 4.1.3: 0.2)")
    a("--fuse-with", choices=["teacher", "student"],
      help="MLMT network whose val scores are written and fused: teacher (released README, default) or student "
           "(Eq. (7) names 'the soft output of the MLMT-branch')")
    # MLMT (Sec. 3.2; the released train_mlmt.py where the paper is silent)
    a("--mlmt-backbone", choices=["resnet101", "resnet50", "resnet18", "resnet10"], help="Sec. 4.1.2: resnet101")
    a("--mlmt-init", choices=["imagenet", "synthetic", "none"],
      help="Sec. 4.1.2: ImageNet; synthetic: this classifier pretrained on the presence of other generated shapes "
           "(built once, cached; its fc fresh)")
    a("--mlmt-size", type=int, help="MLMT input, images resized to S x S (code: 320)")
    a("--mlmt-epochs", type=int, help="passes over the labeled images (code: 100)")
    a("--mlmt-batch-size", type=int, help="labeled images per MLMT step (code: 16)")
    a("--mlmt-batch-size-unl", type=int, help="unlabeled images per MLMT step (code: 80)")
    a("--mlmt-lr", type=float, help="SGD (Nesterov 0.9) learning rate, cosine-annealed per epoch (code: 0.03)")
    a("--mlmt-lr-min", type=float, help="end of the cosine annealing (code: 1e-4)")
    a("--mlmt-weight-decay", type=float, help="(code: 1e-5)")
    a("--lambda-cons", type=float, help="lambda_cons, Eq. (6) (Sec. 4.1.3: 1.0)")
    a("--cons", choices=["mse", "cosine"], help="mse: paper Eq. (6), all images; cosine: released code (quirk)")
    a("--burn-in", type=int, help="epochs without consistency loss, then a linear ramp of its weight to 1 over half "
                                  "of --mlmt-epochs (code: 10)")
    a("--ema-decay", type=float, help="teacher EMA decay, min(1 - 1/(t+1), this) (code: 0.999)")
    a("--mlmt-eval-every", type=int, help="log the MLMT's val scores every N epochs (code: 5)")
    # released-code quirks
    on_off = dict(action=argparse.BooleanOptionalAction, default=None)   # each quirk also has a --no- form
    a("--official-optimizer", **on_off, help="quirk: 3-4 SGD sub-steps per backbone weight")
    a("--official-input", **on_off, help="quirk: the released loaders' input scaling")
    a("--stride-in-1x1", **on_off, help="quirk: Caffe stride placement with torchvision weights")
    a("--official-dropout", **on_off, help="quirk: Dropout2d after D's conv1-3 only")
    a("--official-context-aug", **on_off, help="quirk: Context short side 252-1010, blur")
    a("--fuse-logits", **on_off, help="quirk: Eq. (7) on logits, keeping scores >= tau")
    a("--official-quirks", action="store_true", help="turn on every released-code quirk (docstring deviations 2-13)")
    a("--amp", dest="no_amp", action="store_false", default=None,
      help="keep bf16 autocast under --official-quirks, which implies --no-amp (deviation 3)")
    # run
    a("--eval-every", type=int, help="evaluate s4GAN every N iterations (0: only at the end; also fused with "
                                     "--mlmt-scores)")
    a("--eval-batch-size", type=int)
    a("--eval-short-side", type=int, help="Context: resize the short side to S, score the central S x S (code: 512)")
    a("--log-every", type=int, help="print and log every N iterations (the only host-device sync in the loop)")
    a("--save-every", type=int, help="write last.pt every N iterations")
    a("--stop-at", type=int, help="stop s4GAN after this many iterations with a checkpoint (continue with --resume)")
    a("--benchmark", type=int, metavar="N", help="time N training iterations after a warm-up, write benchmark.json; "
      "no evaluation, pictures or checkpoints (README, 'Throughput')")
    a("--peak-tflops", type=float, help="the device's dense bf16 peak for --benchmark (default: a table of known GPUs)")
    a("--num-pictures", type=int, default=4, help="val images drawn into predictions.png")
    return p


def resolve_args(args):
    """Fill every unset option: explicit flag > --official-quirks > dataset preset > paper default."""
    if args.data not in PRESETS:
        raise DataError(f"unknown --data {args.data!r}; choose one of: {', '.join(PRESETS)}")
    if not args.split and not (0 < args.labeled <= 1):
        raise DataError(f"--labeled must be a fraction in (0, 1], got {args.labeled}")
    quirks = {**OFFICIAL_QUIRKS, **OFFICIAL_QUIRKS_DATA[args.data]} if args.official_quirks else {}
    merged = {**PAPER, **PRESETS[args.data], **{k: v for k, v in quirks.items() if v is not None}}
    for k, v in merged.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("crop_size", "resize", "eval_pad", "aspp_rates"):
        if getattr(args, k) is not None:
            setattr(args, k, tuple(getattr(args, k)))
    if args.benchmark is not None and (args.benchmark < 1 or args.resume):
        raise DataError("--benchmark N times N >= 1 iterations of a new run (not with --resume)")
    if args.benchmark is not None and args.stage == "mlmt":
        raise DataError("--benchmark times the s4GAN training loop; it does not run with --stage mlmt")
    if args.workers is None:
        args.workers = common.default_workers(args.device, image_streams=3, label_streams=0)
    # padded label pixels: ignored (255), except with the released Context augmentation, which labels them background
    # 0 and pads only when its short side (252-1010) is under the crop (deviation 6)
    args.label_pad = 0 if args.official_context_aug and args.data == "context" else IGNORE
    if not 0 < args.gamma < 1 or not 0 < args.tau < 1:
        raise DataError(f"--gamma and --tau are thresholds on probabilities, in (0, 1); got {args.gamma}, {args.tau}")
    if args.mlmt_backbone == "resnet10" and args.mlmt_init == "imagenet":
        raise DataError("--mlmt-backbone resnet10 has no ImageNet weights; use --mlmt-init synthetic or none")
    if args.mlmt_scores and args.stage == "mlmt":
        raise DataError("--mlmt-scores fuses an s4GAN run with another run's MLMT; it does nothing with --stage mlmt")
    if args.mlmt_scores and not os.path.isfile(args.mlmt_scores):
        raise DataError(f"--mlmt-scores {args.mlmt_scores!r} does not exist")
    return args


# ================================================================================================================
# Segmentation network S: DeepLab-v2 (card 4.1), parameter names as torchvision's ResNet plus `layer5` (card 4.2)
# ================================================================================================================
class Bottleneck(nn.Module):
    """ResNet-v1 bottleneck as in Caffe DeepLab: the stride sits in the first 1x1 conv (card 4.1), unless
    `stride_in_3x3` (torchvision's placement, card 4.2 caveat 1). Every 3x3 has dilation d and padding d."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, stride_in_3x3=False):
        super().__init__()
        s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34, for small runs only; not in the paper), dilated like the bottleneck."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, stride_in_3x3=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ASPP(nn.Module):
    """DeepLab-v2 ASPP (card 4.1): parallel 3x3 convs with bias at rates 6/12/18/24, outputs summed; no BN/ReLU.

    `branches=2` reproduces the released code's bug (return inside the loop: rate 6 + rate 12 only). All four convs
    always exist so that checkpoints stay interchangeable."""

    def __init__(self, in_channels, num_classes, rates=(6, 12, 18, 24), branches=4):
        super().__init__()
        self.branches = branches
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for conv in self.conv2d_list:           # card 4.1: weights N(0, 0.01); the biases keep PyTorch's default
            nn.init.normal_(conv.weight, 0, 0.01)   # U(-1/sqrt(fan_in), +) as the released deeplabv2.py (card 4.1)

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:self.branches]:
            out = out + conv(x)
        return out


BACKBONES = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
             "resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet101": (Bottleneck, (3, 4, 23, 3))}


class DeepLabV2(nn.Module):
    """DeepLab-v2 ResNet (card 4.1): ceil-mode max-pool, layer3/layer4 dilated by 2/4 with stride 1 (output stride 8),
    the first block of each dilated stage included; ASPP `layer5`. Returns logits at 1/8 of the input, (N, C, h, w).
    `output_stride=16` keeps layer3's stride (dilation 1/2), a cheaper variant for small runs (not in the paper)."""

    def __init__(self, num_classes, backbone="resnet101", aspp_rates=(6, 12, 18, 24), aspp_branches=4,
                 stride_in_3x3=False, output_stride=8, width=64):
        super().__init__()
        block, layers = BACKBONES[backbone]
        self.backbone_name = backbone
        self.inplanes, self.stride_in_3x3 = width, stride_in_3x3
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)   # ceil mode: 512x1024 -> 65x129 logits
        d3, s3 = (2, 1) if output_stride == 8 else (1, 2)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=s3, dilation=d3)
        self.layer4 = self._make_layer(block, width * 8, layers[3], dilation=2 * d3)
        for m in self.modules():                       # card 4.1: conv N(0, 0.01), BN weight 1 bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.layer5 = ASPP(width * 8 * block.expansion, num_classes, aspp_rates, aspp_branches)
        for m in self.modules():                       # card 4.1: BN affine frozen (statistics: see --freeze-bn-stats)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion or dilation > 1:   # first block: always
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, dilation, downsample, self.stride_in_3x3)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation, None, self.stride_in_3x3) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):                                            # (N, 3, H, W)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))         # (N, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))    # (N, 2048, H/8, W/8)
        return self.layer5(x)                                        # (N, C, H/8, W/8)




# ================================================================================================================
# Discriminator D (Sec. 4.1.2, card 4.3): four 4x4 stride-2 convs {64, 128, 256, 512}, LeakyReLU 0.2, dropout 0.5,
# global average pooling (the feature of L_fm), one linear logit. Its input: C class channels, then 3 image channels.
# ================================================================================================================
class Discriminator(nn.Module):
    """`layers` 4x4 stride-2 convs before the pooling (Sec. 4.1.2: 4), named convs.0 ... convs.3 for the paper's D.

    Receptive field of the stack before the pooling: each 4x4 stride-2 conv adds 3 px times the stride before it,
    r(L) = 1 + 3 (1 + 2 + ... + 2^(L-1)) = 3 * 2^L - 2: 4, 10, 22, 46, 94 px for L = 1..5. The paper's 4 convs see
    46 px of the 321 px VOC crop, 14.3% (the project keeps this ratio to the training crop: methods/README rule 4).
    On the synthetic preset's 80 px images that is 11.5 px: 2 convs see 10 px (12.5%), 3 convs 22 px (27.5%), so
    the preset takes 2 (deviation 16); the pooling then averages a 20x20 map, as the paper's D does on 321 px."""

    def __init__(self, num_classes, ndf=64, official_dropout=False, layers=4):
        super().__init__()
        chans = [num_classes + 3] + [ndf * 2 ** k for k in range(layers)]    # paper: C+3, 64, 128, 256, 512
        self.convs = nn.ModuleList(nn.Conv2d(chans[k], chans[k + 1], 4, stride=2, padding=1) for k in range(layers))
        if official_dropout:     # released code: Dropout2d (whole channels) after conv1-3, none after conv4 (dev. 7)
            self.drops = nn.ModuleList([nn.Dropout2d(0.5) for _ in range(layers - 1)] + [nn.Identity()])
        else:                    # Sec. 4.1.2: "each followed by a Leaky-ReLU ... and a dropout layer" [35]
            self.drops = nn.ModuleList(nn.Dropout(0.5) for _ in range(layers))
        self.fc = nn.Linear(chans[-1], 1)
        self.leaky_relu = nn.LeakyReLU(0.2)

    def forward(self, x):                              # (N, C+3, H, W)
        for conv, drop in zip(self.convs, self.drops):
            x = drop(self.leaky_relu(conv(x)))         # paper: (N, 64, H/2, W/2) ... (N, 512, H/16, W/16)
        feat = x.float().mean((2, 3))                  # (N, 512): global average pooling, D_k of Eq. (2), in
                                                       # float32 also under bf16 autocast (a mean of 20x20 terms)
        return self.fc(feat), feat                     # logit (N, 1): the sigmoid lives in the losses


def up(x, size):
    """Bilinear upsampling with align_corners=True (card 2) to the (H, W) of the crop."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def one_hot(label, num_classes):
    """(N, H, W) -> (N, C, H, W) float; ignore pixels (255) become all-zero vectors (card 3.6, deviation 8: kept)."""
    return (label[:, None] == torch.arange(num_classes, device=label.device)[None, :, None, None]).float()


def d_input(seg, image):
    """Card 3.6: segmentation channels (probabilities or one-hot) followed by the image min-max normalised to [0, 1]
    over the whole batch tensor, (N, C+3, H, W)."""
    lo, hi = image.amin(), image.amax()
    return torch.cat([seg, (image - lo) / (hi - lo).clamp(min=1e-6)], 1)


# ================================================================================================================
# MLMT classifier (Sec. 3.2, 4.1.2): torchvision ResNet-101 with a C-way linear layer, sigmoid outputs
# ================================================================================================================
def make_classifier(backbone, num_classes, init, src=None):
    """init imagenet: torchvision's weights; synthetic: the file `src` (mlmt_pretrained); none: random. Every tensor
    but the output layer `fc` is copied (names and shapes must all fit); `fc` is always fresh."""
    import torchvision
    if backbone == "resnet10":     # synthetic preset only: one basic block per stage (not in the paper)
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        net = getattr(torchvision.models, backbone)()
    if init == "imagenet":
        src = {"resnet18": torchvision.models.ResNet18_Weights, "resnet50": torchvision.models.ResNet50_Weights,
               "resnet101": torchvision.models.ResNet101_Weights}[backbone].IMAGENET1K_V1.url
    if init != "none":
        state = load_state(src)
        state = state.get("state_dict", state)                        # common.synthetic_pretrained's file
        body = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unused = net.load_state_dict(body, strict=False)
        except RuntimeError as e:                                      # a shape that does not fit
            raise DataError(f"{src} does not fit the MLMT classifier {backbone}: {str(e).splitlines()[1].strip()}; "
                            f"check --mlmt-backbone") from None
        if unused or any(not k.startswith("fc.") for k in missing):
            raise DataError(f"{src} does not fit the MLMT classifier {backbone}: missing {missing[:3]}, "
                            f"unexpected {unused[:3]}; check --mlmt-backbone")
    net.fc = nn.Linear(net.fc.in_features, num_classes)   # fresh: the student's and the teacher's differ (dev. 11)
    return net


def mlmt_pretrained(args):
    """--mlmt-init synthetic: the path of this classifier pretrained on which of the other generated shapes an image
    holds (common.synthetic_pretrained, binary cross-entropy on class presence; built once, cached)."""
    return common.synthetic_pretrained(f"s4gan_mlmt-mlmt-{args.mlmt_backbone}-{args.mlmt_size}",
                                       lambda c: make_classifier(args.mlmt_backbone, c, "none"),
                                       common.Normalize("imagenet"), args.device)   # as MLMTDataset normalises


def load_state(src, hint="check the network connection"):
    """A state dict from a file or URL, never unpickling anything but tensors (weights_only=True)."""
    try:
        if os.path.isfile(src):
            return torch.load(src, map_location="cpu", weights_only=True)
        if "://" in src:
            return torch.hub.load_state_dict_from_url(src, map_location="cpu", weights_only=True, progress=True)
        raise DataError(f"{src!r} does not exist")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not load weights from {src}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}; "
                        f"{hint}") from None


# ================================================================================================================
# Losses, one per equation. Means over what counts (deviation 1); every mean divides by max(count, 1), so nothing
# here needs a host-device sync and an empty selection gives 0, not NaN.
# ================================================================================================================
def bce(z, target):
    """Mean binary cross-entropy of logits z against a constant target (0: fake, 1: real)."""
    return F.binary_cross_entropy_with_logits(z.float(), torch.full_like(z.float(), float(target)))


# Eq. (1): L_ce = -sum_{h,w,c} y log S(x), over labeled pixels with y != 255 (mean, deviation 1)
def loss_ce(pred, label):
    loss = F.cross_entropy(pred, label, ignore_index=IGNORE, reduction="none")   # 0 at ignored pixels
    return loss.sum() / (label != IGNORE).sum().clamp(min=1)


# Eq. (2): L_fm = || E[D_k(y + x)] - E[D_k(S(x_u) + x_u)] ||, as mean |difference| over the 512 features (dev. 8)
def loss_fm(feat_real, feat_fake):
    return (feat_real.float().mean(0) - feat_fake.float().mean(0)).abs().mean()


# Eq. (3): L_st = -sum y* log S(x_u) if D(S(x_u) + x_u) >= gamma, else 0; y* = argmax S(x_u) on every pixel (dev. 9)
def loss_st(pred_u, z_u, gamma, active=True):
    """Returns (L_st, selected (N,) float). The mean over the selected images' pixels: all images have the same
    size, so it is the mean of their per-image means."""
    selected = (torch.sigmoid(z_u.detach().float())[:, 0] >= gamma).float() * float(active)
    pseudo = pred_u.detach().argmax(1)                                           # hard labels, no ignore
    per_image = F.cross_entropy(pred_u, pseudo, reduction="none").flatten(1).mean(1)   # (N,)
    return (per_image * selected).sum() / selected.sum().clamp(min=1), selected


# Eq. (4): L_S = L_ce + lambda_fm L_fm + lambda_st L_st (Table 6 "CE + SGAN": + lambda_gan BCE(D(S(x_u) + x_u), 1))
def loss_S(l_ce, l_fm, l_st, l_gan, lambda_fm, lambda_st, lambda_gan):
    return l_ce + lambda_fm * l_fm + lambda_st * l_st + lambda_gan * l_gan


# Eq. (5): max_D E[log D(y + x)] + E[log(1 - D(S(x_u) + x_u))], as 1/2 (BCE(real, 1) + BCE(fake, 0)) (deviation 1)
def loss_D(z_real, z_fake):
    return 0.5 * bce(z_real, 1) + 0.5 * bce(z_fake, 0)


# Eq. (6), first term: -sum_c z log G(x_l), as sigmoid + binary cross-entropy over N x C entries (deviation 10)
def loss_cls(logits, z):
    return F.binary_cross_entropy_with_logits(logits.float(), z.float())


# Eq. (6), second term: ||G(x) - H(x')||^2 on sigmoid outputs, mean over images and classes (paper), or the
# released code's 1 - cosine(G logits, H logits) (deviation 11). The teacher's side is a constant.
def loss_cons(student_logits, teacher_logits, kind="mse"):
    s, t = student_logits.float(), teacher_logits.detach().float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=1)).mean()
    return ((torch.sigmoid(s) - torch.sigmoid(t)) ** 2).mean()


def cons_weight(epoch, burn_in, num_epochs):
    """Released train_mlmt.py (deviation 11): w(e) = 0 for e <= burn_in, then min(1, (e - burn_in) * 2 / num_epochs),
    e counted from 0: the ramp takes half of the run (50 epochs of 100)."""
    return 0.0 if epoch <= burn_in else min(1.0, (epoch - burn_in) * 2 / num_epochs)


@torch.no_grad()
def ema_update(teacher, student, step, decay):
    """Mean teacher: theta' <- a theta' + (1 - a) theta, a = min(1 - 1/(t + 1), decay), t counted from 1 (card 3.7).
    Parameters only: the teacher's BN statistics come from its own forward passes (deviation 11)."""
    a = min(1 - 1 / (step + 1), decay)
    t_params, s_params = list(teacher.parameters()), list(student.parameters())   # 314 tensors for ResNet-101
    torch._foreach_mul_(t_params, a)                   # two multi-tensor kernels instead of 628 small ops
    torch._foreach_add_(t_params, s_params, alpha=1 - a)


# Eq. (7): S(x)_c = 0 where G(x)_c <= tau, on the softmax probabilities. `official`: the released code (deviation
# 12), which multiplies the logits and keeps scores >= tau. `scores` (N, C): the MLMT's probabilities (--fuse-with).
def fuse(pred, scores, tau, official=False):
    keep = (scores >= tau if official else scores > tau).to(pred.dtype)[:, :, None, None]   # (N, C, 1, 1)
    return pred * keep if official else F.softmax(pred, 1) * keep


# ================================================================================================================
# Optimisation (Sec. 4.1.3): SGD for S with 10x learning rate on the ASPP (dev. 4), Adam for D, both poly decay
# ================================================================================================================
class OfficialSGD(torch.optim.Optimizer):
    """Released-code quirk (deviation 3, card 4.1): the code lists each backbone weight k times in one SGD group
    (stem conv 1, bottleneck convs 3, downsample convs 4), and the PyTorch <= 0.4 SGD it ran on stepped once per
    listing with the same gradient and one shared momentum buffer. Each listing did, in place,
        d_p = p.grad; d_p += wd * p  (into p.grad itself, so the decay accumulates over the k sub-steps)
        buf = momentum * buf + d_p;  p -= lr * (d_p + momentum * buf if nesterov else buf)
    Written out here because passing duplicates to torch.optim is undefined. Vectorised: the tensors of one group
    with the same k form one bucket, stepped with torch._foreach_* ops (a few dozen ops per step, not thousands)."""

    def __init__(self, param_groups, momentum, weight_decay, nesterov=False):
        super().__init__(param_groups, dict(lr=0.0, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                            k=None))

    def _buffer(self, p):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for k in sorted(set(g["k"])):
                params = [p for p, n in zip(g["params"], g["k"]) if n == k and p.grad is not None]
                if not params:
                    continue
                grads, bufs = [p.grad for p in params], [self._buffer(p) for p in params]
                for _ in range(k):                                   # one sub-step per listing
                    if g["weight_decay"]:
                        torch._foreach_add_(grads, params, alpha=g["weight_decay"])   # into p.grad: accumulates
                    torch._foreach_mul_(bufs, g["momentum"])
                    torch._foreach_add_(bufs, grads)
                    update = torch._foreach_add(grads, bufs, alpha=g["momentum"]) if g.get("nesterov") else bufs
                    torch._foreach_add_(params, update, alpha=-g["lr"])


def make_optimizers(model, D, args):
    backbone = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("layer5.")]
    head = [p for p in model.layer5.parameters()]
    if args.official_optimizer:   # stem conv 1x, bottleneck convs 3x, downsample convs 4x
        k = [1 if n.startswith("conv1.") else 4 if ".downsample." in n else 3 for n, _ in backbone]
        opt_S = OfficialSGD([dict(params=[p for _, p in backbone], k=k), dict(params=head, k=[1] * len(head))],
                            args.momentum, args.weight_decay, args.nesterov)
    elif args.optimizer == "adam":  # synthetic preset (deviation 16): chosen from scratch, where SGD was far slower
        opt_S = torch.optim.Adam([dict(params=[p for _, p in backbone]), dict(params=head)], lr=args.lr,
                                 weight_decay=args.weight_decay)
    else:
        opt_S = torch.optim.SGD([dict(params=[p for _, p in backbone]), dict(params=head)], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.9, 0.99))   # Sec. 4.1.3: betas (0.9, 0.99)
    return opt_S, opt_D


def poly_lr(opt_S, opt_D, i, args):
    """Sec. 4.1.3: lr_i = lr * (1 - i/T)^0.9 for S and D; the ASPP group at 10x (card 4.1)."""
    f = (1 - i / args.num_steps) ** args.power
    opt_S.param_groups[0]["lr"], opt_S.param_groups[1]["lr"] = args.lr * f, args.head_lr_mult * args.lr * f
    for g in opt_D.param_groups:
        g["lr"] = args.lr_d * f


def set_train_mode(model, freeze_bn_stats):
    """Released code (card 4.1): whole model in train mode, BN uses batch statistics; --freeze-bn-stats: frozen."""
    model.train()
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


# ================================================================================================================
# Initialisation from pretrained weights (card 4.2): copy every tensor whose name and shape match, and say so
# ================================================================================================================
def load_pretrained(model, state, source):
    """Copy backbone tensors by name and shape (the released code's rule, card 4.2); `layer5` always stays fresh.
    A tensor whose name matches but whose shape does not, or a file that matches nothing, is an error."""
    if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        state = state.get("state_dict", state.get("model", state))
    clean = {}
    for k, v in state.items():
        if torch.is_tensor(v):
            for prefix in ("module.", "Scale."):      # DataParallel and the Caffe port's wrappers
                k = k[len(prefix):] if k.startswith(prefix) else k
            clean[k] = v
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith("layer5.")]
    wrong = [k for k in backbone if k in clean and clean[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise DataError(f"{source} does not fit this network: {len(wrong)} tensors have other shapes "
                        f"(first: {k} {tuple(clean[k].shape)} vs {tuple(own[k].shape)}); check --backbone/--width")
    matched = [k for k in backbone if k in clean]
    if not matched:
        raise DataError(f"{source} matches no backbone tensor of DeepLabV2({model.backbone_name}); "
                        f"expected names like conv1.weight, layer1.0.conv1.weight (card 4.2)")
    with torch.no_grad():
        for k in matched:
            own[k].copy_(clean[k])
    missing = [k for k in backbone if k not in clean and not k.endswith("num_batches_tracked")]
    unused = sorted(k for k in clean if k not in backbone)
    print(f"loaded {len(matched)}/{len(backbone)} backbone tensors from {source}; "
          f"not in the file: {missing[:6] or 'none'}{' ...' if len(missing) > 6 else ''}; "
          f"in the file but not loaded: {unused[:8] or 'none'}{' ...' if len(unused) > 8 else ''}"
          f"{' (layer5 is always initialised fresh)' if any(k.startswith('layer5.') for k in unused) else ''}")
    return matched, missing, unused


def initialise(model, args):
    """imagenet (the paper's main rows): torchvision's ResNet; coco: the COCO-pretrained DeepLab-v2 of Table 1's
    "+ COCO" rows (the same file as hung2018; author's answer in sud0301/semisup-semseg #6); synthetic: this
    DeepLabV2 pretrained on other generated shapes (deviation 16)."""
    if args.init == "none":
        return
    if args.init == "imagenet":
        import torchvision
        weights = {"resnet18": torchvision.models.ResNet18_Weights, "resnet34": torchvision.models.ResNet34_Weights,
                   "resnet50": torchvision.models.ResNet50_Weights,
                   "resnet101": torchvision.models.ResNet101_Weights}[args.backbone].IMAGENET1K_V1
        src, hint = weights.url, "check the network connection"
    elif args.init == "synthetic":    # the miniature's pretrained start (common.synthetic_pretrained), built as run()
        # builds it (stride in the 1x1 conv), fed ImageNet-normalised RGB as torchvision's weights (normalizers)
        rates = ".".join(map(str, args.aspp_rates))
        src, hint = common.synthetic_pretrained(
            f"s4gan_mlmt-seg-{args.backbone}-w{args.width}-aspp{rates}x{args.aspp_branches}",
            lambda c: DeepLabV2(c, args.backbone, args.aspp_rates, args.aspp_branches, width=args.width),
            common.Normalize("imagenet"), args.device), "delete the file to build it again"
    else:
        src = args.restore_from or COCO_URL
        hint = "download resnet101COCO-41f33a49.pth by hand (README, 'Weights') and pass --restore-from PATH"
    load_pretrained(model, load_state(src, hint), src)


# ================================================================================================================
# Data. s4GAN: three endless streams (card 5.1): labeled images, unlabeled images, and a second, independent labeled
# stream for D's "real" input. MLMT: weak and strong views of whole images with their class-presence vectors.
# ================================================================================================================
def normalizers(args):
    """(train, eval) input normalisation. It follows the weights (methods/README); `--official-input` reproduces the
    released loaders (deviation 5): VOC RGB 0-255 minus the Caffe mean; Cityscapes BGR minus (73.158, 82.909, 72.392),
    over 255; Context the ImageNet statistics with the mean reversed in training only."""
    if args.init == "coco":
        n = common.Normalize("caffe", bgr=not args.official_input)
        return n, n
    if not args.official_input:
        return common.Normalize("imagenet"), common.Normalize("imagenet")
    if args.data in ("cityscapes", "synthetic-cityscapes"):   # the paper preset on generated data too
        n = common.Normalize("custom", bgr=True, mean=np.float32((73.158, 82.909, 72.392)) / 255, div=255)
        return n, n
    if args.data == "context":
        std = common.Normalize.IMAGENET_STD
        return (common.Normalize("custom", bgr=False, mean=common.Normalize.IMAGENET_MEAN[::-1], std=std, div=255),
                common.Normalize("imagenet"))
    n = common.Normalize("caffe", bgr=False)
    return n, n


def build_data(args, source, labeled, unlabeled, stream_states=None):
    normalize, eval_normalize = normalizers(args)
    official_ctx = args.official_context_aug and args.data == "context"      # deviation 6
    scales = [0.5 + k / 10 for k in range(12)] if args.random_scale and not official_ctx else None   # {0.5..1.6}
    train_tf = common.TrainTransform(normalize, args.crop_size, scales, args.random_mirror, args.resize,
                                     short_side=(252, 1010) if official_ctx else None, blur=0.5 if official_ctx else 0,
                                     label_pad=args.label_pad, resample=args.resample)
    eval_tf = common.EvalTransform(eval_normalize, args.eval_pad, args.resize, short_side=args.eval_short_side,
                                   resample=args.resample)
    pin = args.device.startswith("cuda")
    states = stream_states or {}
    make = lambda name, ds, k: common.InfiniteLoader(ds, args.batch_size, args.seed * 3 + k, args.workers, pin,
                                                     states.get(name, (0, 0)), device=args.device)
    streams = {"labeled": make("labeled", common.SegDataset(source, labeled, train_tf, args.seed), 0)}
    if use_D(args):
        # card 5.1 "Full": with every image labeled, the unlabeled stream is the labeled set with its labels unread
        streams["unlabeled"] = make("unlabeled", common.SegDataset(source, unlabeled or labeled, train_tf,
                                                                   args.seed + 1), 1)
        streams["gt"] = make("gt", common.SegDataset(source, labeled, train_tf, args.seed + 2), 2)
    val = common.EvalLoader(common.SegDataset(source, source.splits["val"], eval_tf), args.eval_batch_size,
                            args.workers, args.device)
    return streams, val, eval_normalize


def use_D(args):
    return args.lambda_fm > 0 or args.lambda_st > 0 or args.lambda_gan > 0


def class_vector(label, num_classes):
    """Card 7.1: 1 for every class with at least one pixel in the mask (255 ignored), background = index 0."""
    z = np.zeros(num_classes, np.float32)
    present = np.unique(label)
    z[present[present < num_classes]] = 1
    return z


class MLMTDataset(torch.utils.data.Dataset):
    """Card 3.7: the image resized to size x size (aspect not kept), as uint8 (3, H, W); the training loop
    ImageNet-normalises it on the device (`self.normalize.batch`, common.Normalize). Training yields a weak view
    (random flip) and a strong view (own flip, colour jitter 0.4/0.4/0.4/0.1, Gaussian blur sigma U(0.1, 2)); evaluation
    yields the resized image twice. With `with_labels`, the class vector of the mask; otherwise zeros (never read)."""

    def __init__(self, source, ids, size, num_classes, seed=0, train=True, with_labels=True):
        self.source, self.ids, self.size, self.C, self.seed = source, list(ids), size, num_classes, seed
        self.train, self.with_labels, self.epoch = train, with_labels, 0
        self.normalize = common.Normalize("imagenet")
        import torchvision
        self.jitter = torchvision.transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)      # strong view (card 3.7)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.ids)

    def _tensor(self, im):                 # uint8 (3, H, W): a quarter of float32's bytes to the device
        return torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))

    def __getitem__(self, key):             # an index, or a (pass, index) pair from mlmt_batches' samplers
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        img, lab = self.source.read(self.ids[i])
        z = class_vector(lab, self.C) if self.with_labels else np.zeros(self.C, np.float32)
        base = Image.fromarray(img)
        if base.size != (self.size, self.size):
            base = base.resize((self.size, self.size), Image.BILINEAR)
        if not self.train:
            x = self._tensor(base)
            return x, x, torch.from_numpy(z)
        seed = hash((self.seed, epoch, i)) & 0xFFFFFFFF
        rng = random.Random(seed)
        flip = lambda im: im.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im
        weak, strong = flip(base), flip(base)                       # flipped independently (card 3.7)
        with torch.random.fork_rng(devices=[]):                     # ColorJitter draws from torch's RNG: seed it here
            torch.manual_seed(seed)
            strong = self.jitter(strong)
        strong = strong.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        return self._tensor(weak), self._tensor(strong), torch.from_numpy(z)


def mlmt_batches(lab_ds, unl_ds, batch_size, batch_size_unl, seed, start_epoch, workers, pin):
    """Endless (labeled, unlabeled) batch pairs from epoch `start_epoch` on, two loaders created once (persistent
    workers). Labeled epoch e is one pass in the seeded order of seed `seed` and pass e (the last batch may be
    partial, card 5.3); its unlabeled partners are passes e * 1000, e * 1000 + 1, ... over the unlabeled images
    (seed `seed + 1`), restarted every epoch, as many batches as the labeled pass has. Augmentations depend on
    (seed, pass, index) only, so a run resumed at an epoch draws the same batches."""
    lab = common.EpochBatchSampler(len(lab_ds), batch_size, seed, state=(start_epoch, 0))
    unl = common.EpochBatchSampler(len(unl_ds), batch_size_unl, seed + 1)
    steps = lab.batches_per_pass()

    def unl_batches():
        for epoch in itertools.count(start_epoch):
            taken, p = 0, 0
            while taken < steps:
                order = unl.order(epoch * 1000 + p)
                for b in range(0, len(order), batch_size_unl):
                    if taken == steps:
                        break
                    yield [(epoch * 1000 + p, i) for i in order[b:b + batch_size_unl]]
                    taken += 1
                p += 1

    kw = dict(num_workers=workers, pin_memory=pin, **(dict(persistent_workers=True) if workers else {}))
    return (zip(torch.utils.data.DataLoader(lab_ds, batch_sampler=lab, **kw),
                torch.utils.data.DataLoader(unl_ds, batch_sampler=_Batches(unl_batches), **kw)), steps)


class _Batches(torch.utils.data.Sampler):
    """A batch sampler from a generator function (endless; iterated once)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


# ================================================================================================================
# Training s4GAN (card 5.1): both backward passes against the same D, then both optimizer steps
# ================================================================================================================
LOG_KEYS = ("loss_ce", "loss_fm", "loss_st", "loss_gan", "loss_D", "D_real", "D_fake", "st_selected")


class Meter:
    """Running sums on the device, read (one host-device sync) only when a log line is written."""

    def __init__(self, keys, device):
        self.keys, self.sums, self.counts = keys, torch.zeros(len(keys), device=device), [0] * len(keys)

    def add(self, key, value):
        k = self.keys.index(key)
        self.sums[k] += value.detach().float()
        self.counts[k] += 1

    def read(self):
        values = (self.sums / torch.tensor([max(c, 1) for c in self.counts], device=self.sums.device)).tolist()
        out = {k: round(v, 5) for k, v, c in zip(self.keys, values, self.counts) if c}
        self.sums.zero_()
        self.counts = [0] * len(self.keys)
        return out


def write_log(run_dir, rec):
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def train(args, run_dir, model, D, opt_S, opt_D, streams, val_loader, start, class_names, scores=None):
    device = torch.device(args.device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
    C = len(class_names)
    has_D = "gt" in streams
    stop = min(args.num_steps, args.stop_at or args.num_steps)
    meter = Meter(LOG_KEYS, device)

    def to_dev(t, image=False):       # batches arrive on the device, normalised, labels int64 (common.InfiniteLoader)
        return t.contiguous(memory_format=torch.channels_last) if image else t

    set_train_mode(model, args.freeze_bn_stats)
    D.train()                         # card 4.3: dropout stays on, also for L_fm's features and L_st's scores
    t_last, i_last, images = time.time(), start, 0
    for i in range(start, stop):
        poly_lr(opt_S, opt_D, i, args)
        opt_S.zero_grad(set_to_none=True)
        opt_D.zero_grad(set_to_none=True)
        D.requires_grad_(False)       # L_S must not update D; its gradients pass through D into S (card 3.2)

        # (1) segmentation network on a labeled batch: L_ce, Eq. (1)
        x, y, _ = next(streams["labeled"])
        x, y = to_dev(x, image=True), to_dev(y)
        with torch.autocast(**amp):
            pred = up(model(x).float(), y.shape[-2:])                  # (N, C, H, W) logits
        l_ce = loss_ce(pred, y)
        l_ce.backward()               # the labeled graph is freed here; the gradients add up with (2)'s
        meter.add("loss_ce", l_ce)
        images += x.shape[0]

        if has_D:
            # (2) segmentation network on an unlabeled batch: lambda_fm L_fm + lambda_st L_st, Eqs. (2)-(4)
            x_u = to_dev(next(streams["unlabeled"])[0], image=True)   # its labels are never read
            x_g, y_g, _ = next(streams["gt"])                          # D's "real": a second labeled batch (card 3.2)
            x_g, onehot_g = to_dev(x_g, image=True), one_hot(to_dev(y_g), C)
            with torch.autocast(**amp):
                pred_u = up(model(x_u).float(), x_u.shape[-2:])        # (N, C, H, W)
                p_u = F.softmax(pred_u, 1)
                z_u, feat_u = D(d_input(p_u, x_u))                     # (N, 1), (N, 512)
                with torch.no_grad():                                  # the real side has no path to S
                    _, feat_g = D(d_input(onehot_g, x_g))
            l_fm = loss_fm(feat_g, feat_u)
            l_st, selected = loss_st(pred_u, z_u, args.gamma, active=i > 0)   # no L_st at iteration 0 (dev. 9)
            l_gan = bce(z_u, 1) if args.lambda_gan > 0 else 0                # Table 6 "CE + SGAN" only
            loss_S(0, l_fm, l_st, l_gan, args.lambda_fm, args.lambda_st, args.lambda_gan).backward()
            meter.add("loss_fm", l_fm), meter.add("loss_st", l_st), meter.add("st_selected", selected.mean())
            if args.lambda_gan > 0:
                meter.add("loss_gan", l_gan)
            images += 2 * x_u.shape[0]

            # (3) discriminator, Eq. (5): ground truth of the second labeled batch is real, unlabeled predictions
            # fake (detached, so no gradient reaches S); D runs again, with new dropout masks (card 3.5)
            D.requires_grad_(True)
            with torch.autocast(**amp):
                z_fake, _ = D(d_input(p_u.detach(), x_u))
                z_real, _ = D(d_input(onehot_g, x_g))
            l_D = loss_D(z_real, z_fake)
            l_D.backward()
            meter.add("loss_D", l_D)
            meter.add("D_real", torch.sigmoid(z_real.detach().float()).mean())   # paper Fig. 11
            meter.add("D_fake", torch.sigmoid(z_fake.detach().float()).mean())

        opt_S.step()                  # both steps after both backward passes (card 5.1, step 11)
        if has_D:
            opt_D.step()

        it = i + 1
        if it % args.log_every == 0 or it == stop:
            dt = time.time() - t_last
            rec = {"iter": it, **meter.read(), "img_per_s": round(images / dt, 1), "lr": opt_S.param_groups[0]["lr"]}
            eta = (args.num_steps - it) * dt / max(it - i_last, 1)
            mem = ""
            if device.type == "cuda":
                rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                mem = f" mem {rec['peak_mem_gib']:.1f}G"
            print(f"[{it}/{args.num_steps}] " + " ".join(f"{k} {rec[k]:.4f}" for k in LOG_KEYS if k in rec) +
                  f" | {rec['img_per_s']} img/s{mem} | ETA {datetime.timedelta(seconds=int(eta))}", flush=True)
            write_log(run_dir, rec)
            t_last, i_last, images = time.time(), it, 0
        if not args.benchmark and (it % args.save_every == 0 or it == stop):   # --benchmark: no checkpoint
            save_atomic({"iteration": it, "model": model.state_dict(), "D": D.state_dict(),
                         "opt_S": opt_S.state_dict(), "opt_D": opt_D.state_dict(),
                         "streams": {k: s.state() for k, s in streams.items()}, "rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0)},
                        os.path.join(run_dir, "last.pt"))                  # the RNG: D's dropout masks continue exactly
        if args.eval_every and it % args.eval_every == 0 and it < args.num_steps:
            with torch.random.fork_rng(devices=[]):   # opening the loader draws from the RNG of D's dropout
                result, fused, _ = evaluate(model, val_loader, C, device, amp, scores, args.tau, args.fuse_logits)
            write_log(run_dir, {"iter": it, "val_miou": result["miou"], **({"val_miou_fused": fused["miou"]} if fused
                                                                          else {})})
            print(f"[{it}] val mIoU {100 * result['miou']:.2f}" +
                  (f", with --mlmt-scores {100 * fused['miou']:.2f}" if fused else ""), flush=True)
            set_train_mode(model, args.freeze_bn_stats)
    return stop


def save_atomic(state, path):
    """Everything needed to continue exactly (the split is labeled.txt beside it), written atomically."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


# ================================================================================================================
# Training MLMT (Sec. 3.2, card 5.3): epochs over the labeled images, each labeled batch paired with an unlabeled one
# ================================================================================================================
MLMT_KEYS = ("loss_cls", "loss_cons")


def train_mlmt(args, run_dir, source, labeled, unlabeled, class_names):
    device = torch.device(args.device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
    C = len(class_names)
    ckpt_path = os.path.join(run_dir, "mlmt_last.pt")
    src = mlmt_pretrained(args) if args.mlmt_init == "synthetic" else None
    torch.manual_seed(args.seed + 7)
    student = make_classifier(args.mlmt_backbone, C, args.mlmt_init, src)
    teacher = make_classifier(args.mlmt_backbone, C, args.mlmt_init, src)    # same start, its own fc (dev. 11)
    teacher.requires_grad_(False)                                       # changed by the EMA only
    student.to(device, memory_format=torch.channels_last)        # before the optimizer state is loaded: its
    teacher.to(device, memory_format=torch.channels_last)        # momentum buffers follow the parameters' device
    opt = torch.optim.SGD(student.parameters(), lr=args.mlmt_lr, momentum=0.9, nesterov=True,
                          weight_decay=args.mlmt_weight_decay)
    start, step = 0, 0
    if os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"]), teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["opt"])
        start, step = state["epoch"], state["step"]
    pin = device.type == "cuda"
    lab_ds = MLMTDataset(source, labeled, args.mlmt_size, C, args.seed + 10)
    # "Full" (no unlabeled image): the labeled images serve as unlabeled ones too, as in the s4GAN branch
    unl_ds = MLMTDataset(source, unlabeled or labeled, args.mlmt_size, C, args.seed + 11, with_labels=False)
    val_ds = MLMTDataset(source, source.splits["val"], args.mlmt_size, C, train=False)
    batches, steps = mlmt_batches(lab_ds, unl_ds, args.mlmt_batch_size, args.mlmt_batch_size_unl, args.seed + 10,
                                  start, args.workers, pin)                # loaders made once (persistent workers)
    print(f"MLMT: {args.mlmt_backbone} ({args.mlmt_init}{f' from {src}' if src else ''}), "
          f"{args.mlmt_epochs} epochs of {steps} steps "
          f"({args.mlmt_batch_size} labeled + {args.mlmt_batch_size_unl} unlabeled images), consistency {args.cons}; "
          f"starting at epoch {start}")
    meter = Meter(MLMT_KEYS, device)
    result = None
    for epoch in range(start, args.mlmt_epochs):
        # cosine annealing from mlmt_lr to mlmt_lr_min over the epochs, stepped once per epoch (released code)
        lr = args.mlmt_lr_min + (args.mlmt_lr - args.mlmt_lr_min) * (1 + math.cos(math.pi * epoch / args.mlmt_epochs)) / 2
        for g in opt.param_groups:
            g["lr"] = lr
        w = args.lambda_cons * cons_weight(epoch, args.burn_in, args.mlmt_epochs)
        student.train(), teacher.train()            # the teacher's BN statistics follow its own batches (dev. 11)
        t0, images = time.time(), 0
        for (xw_l, xs_l, z_l), (xw_u, xs_u, _) in itertools.islice(batches, steps):   # one labeled pass; the
            # unlabeled order restarts every epoch (card 5.3), its passes numbered epoch * 1000 + k (mlmt_batches)
            xw_l, xs_l, z_l, xw_u, xs_u = (t.to(device, non_blocking=True) for t in (xw_l, xs_l, z_l, xw_u, xs_u))
            xw_l, xs_l, xw_u, xs_u = (lab_ds.normalize.batch(t) for t in (xw_l, xs_l, xw_u, xs_u))   # on the device
            with torch.autocast(**amp):
                s_l = student(xw_l)                                         # (N_l, C) logits
                with torch.no_grad():
                    t_l, t_u = teacher(xw_l), teacher(xw_u)                 # weak views to the teacher
                if args.cons == "cosine":                                   # released code: unlabeled only
                    s_cons, t_cons = student(xs_u), t_u
                else:                                                       # Eq. (6): all samples
                    s_cons, t_cons = student(torch.cat([xs_l, xs_u])), torch.cat([t_l, t_u])
            l_cls = loss_cls(s_l, z_l)
            l_cons = loss_cons(s_cons, t_cons, args.cons)
            opt.zero_grad(set_to_none=True)
            (l_cls + w * l_cons).backward()          # Eq. (6): L_MT = L_cls + lambda_cons w(e) L_cons
            opt.step()
            step += 1
            ema_update(teacher, student, step, args.ema_decay)
            meter.add("loss_cls", l_cls), meter.add("loss_cons", l_cons)
            images += xw_l.shape[0] + xw_u.shape[0]
        rec = {"stage": "mlmt", "epoch": epoch + 1, **meter.read(), "cons_weight": w, "lr": lr,
               "img_per_s": round(images / (time.time() - t0), 1)}
        eta = (args.mlmt_epochs - epoch - 1) * (time.time() - t0)
        last = epoch + 1 == args.mlmt_epochs
        if last or (epoch + 1) % args.mlmt_eval_every == 0:
            result = evaluate_mlmt(teacher, student, val_ds, device, amp, args)
            rec.update({k: v for k, v in result.items() if k != "scores"})
        print(f"[MLMT epoch {epoch + 1}/{args.mlmt_epochs}] " +
              " ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in ("stage", "epoch", "img_per_s", "lr")) +
              f" | {rec['img_per_s']} img/s | ETA {datetime.timedelta(seconds=int(eta))}", flush=True)
        write_log(run_dir, rec)
        save_atomic({"epoch": epoch + 1, "step": step, "student": student.state_dict(), "teacher": teacher.state_dict(),
                     "opt": opt.state_dict()}, ckpt_path)
        if last:
            write_scores(os.path.join(run_dir, "mlmt_val_scores.csv"), source.splits["val"], result["scores"],
                         class_names)
    if result is None:                                  # resumed after the last epoch: evaluate once more
        result = evaluate_mlmt(teacher, student, val_ds, device, amp, args)
        write_scores(os.path.join(run_dir, "mlmt_val_scores.csv"), source.splits["val"], result["scores"], class_names)
    return result


@torch.no_grad()
def evaluate_mlmt(teacher, student, val_ds, device, amp, args):
    """Teacher and student on the val images (eval mode): mean average precision over classes, and precision /
    recall of "present" at tau, the threshold the fusion uses. `scores`: the probabilities of the network that the
    fusion uses (--fuse-with: the teacher by default, deviation 12), (N_val, C)."""
    teacher.eval(), student.eval()
    loader = torch.utils.data.DataLoader(val_ds, 50, num_workers=args.workers)
    outs = {"teacher": [], "student": []}
    targets = []
    for x, _, z in loader:
        x = val_ds.normalize.batch(x.to(device))            # uint8 -> ImageNet-normalised float32 on the device
        with torch.autocast(**amp):
            outs["teacher"].append(torch.sigmoid(teacher(x).float()).cpu())
            outs["student"].append(torch.sigmoid(student(x).float()).cpu())
        targets.append(z)
    z = torch.cat(targets)
    result = {}
    for name, chunks in outs.items():
        p = torch.cat(chunks)
        kept = p > args.tau                                         # as the fusion, Eq. (7)
        result[f"{name}_map"] = mean_average_precision(p, z)
        result[f"{name}_precision_at_tau"] = float((kept & (z > 0)).sum() / kept.sum().clamp(min=1))
        result[f"{name}_recall_at_tau"] = float((kept & (z > 0)).sum() / (z > 0).sum().clamp(min=1))
        if name == args.fuse_with:
            result["scores"] = p
    teacher.train(), student.train()
    return result


def mean_average_precision(scores, targets):
    """Mean over classes with at least one positive of the average precision (area under the precision-recall steps,
    one step per positive, ties broken by order)."""
    aps = []
    for c in range(scores.shape[1]):
        t = targets[:, c][scores[:, c].argsort(descending=True)]
        if t.sum() == 0:
            continue
        hits = t.cumsum(0)
        precision = hits / torch.arange(1, len(t) + 1)
        aps.append(float((precision * t).sum() / t.sum()))
    return float(np.mean(aps)) if aps else float("nan")


def write_scores(path, ids, scores, class_names):
    """The MLMT teacher's val probabilities as CSV: id, one column per class (text, so nothing is ever unpickled)."""
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *class_names])
        for i, row in zip(ids, scores.tolist()):
            w.writerow([i, *(f"{v:.6f}" for v in row)])
    os.replace(path + ".tmp", path)


def read_scores(path, val_ids, class_names):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["id", *class_names]:
        raise DataError(f"{path} is not an MLMT score file of this dataset (header: id, then the {len(class_names)} "
                        f"class names)")
    scores = {}
    for r in rows[1:]:
        try:
            scores[r[0]] = torch.tensor([float(v) for v in r[1:]])
        except ValueError:
            raise DataError(f"{path}: row {r[0]!r} holds something that is not a number") from None
    missing = [i for i in val_ids if i not in scores or len(scores[i]) != len(class_names)]
    if missing:
        raise DataError(f"{path} has no complete row for {len(missing)} val images (first: {missing[0]!r})")
    return scores


# ================================================================================================================
# Evaluation (card 5.4 / 7.5): single scale, dataset-level confusion-matrix mIoU, s4GAN alone and fused with MLMT
# ================================================================================================================
@torch.no_grad()
def evaluate(model, loader, num_classes, device, amp, scores=None, tau=0.2, official=False, num_pictures=0):
    """Returns (s4GAN result, fused result or None, pictures). `scores`: {val id: MLMT teacher probabilities (C,)}."""
    model.eval()
    cm, cm_fused = common.ConfusionMatrix(num_classes, device), common.ConfusionMatrix(num_classes, device)
    pictures = []
    for x, y, ids in loader:
        with torch.autocast(**amp):
            pred = up(model(x).float(), y.shape[-2:])        # logits at the label's size
        seg = pred.argmax(1)
        cm.update(seg, y)
        fused = None
        if scores is not None:                              # Eq. (7)
            fused = fuse(pred, torch.stack([scores[i] for i in ids]).to(device), tau, official).argmax(1)
            cm_fused.update(fused, y)
        for k in range(min(num_pictures - len(pictures), x.shape[0])):
            pictures.append((x[k].cpu(), y[k].cpu(), seg[k].cpu(), None if fused is None else fused[k].cpu()))
    return cm.compute(), cm_fused.compute() if scores is not None else None, pictures


def save_pictures(path, pictures, normalize, pal, class_names):
    """One row per val image: image, ground truth, s4GAN's prediction, and s4GAN + MLMT's (paper Fig. 4 / 7)."""
    rows = []
    for x, y, p, fused in pictures:
        img = common.denormalize(x, normalize)
        rows.append([img, common.colorize(y.numpy(), pal), common.colorize(p.numpy(), pal)] +
                    ([] if fused is None else [common.colorize(fused.numpy(), pal)]))
    scale = max(1, 256 // rows[0][0].shape[0])               # small synthetic images: enlarge for the eye
    rows = [[np.kron(im, np.ones((scale, scale, 1), np.uint8)) for im in r] for r in rows]
    common.save_labeled_grid(path, rows, ["image", "ground truth", "s4GAN", "s4GAN + MLMT, Eq. (7)"][:len(rows[0])],
                             class_names, pal)


# curves.png (as the paper's Fig. 11): S's and D's losses, D's mean outputs with the share of unlabeled images that
# pass gamma into L_st, and val mIoU; curves_mlmt.png: the MLMT's epochs
CURVES = [("S's losses, Eqs. (1)-(4) (mean per logged interval)", ["loss_ce", "loss_fm", "loss_st", "loss_gan"], None),
          ("D's loss, Eq. (5)", ["loss_D"], None),
          ("mean sigmoid(D) on ground truth / predictions; share of unlabeled images in L_st",
           ["D_real", "D_fake", "st_selected"], (0, 1)),
          ("val mIoU: s4GAN, and fused with the MLMT's scores (Eq. (7))", ["val_miou", "val_miou_fused"], None)]


def mlmt_curves(fuse_with):
    return [("MLMT losses, Eq. (6), per epoch (L_cons: before its weight)", ["loss_cls", "loss_cons"], None),
            ("weight of L_cons, lambda_cons w(epoch)", ["cons_weight"], None),
            ("val mean average precision of the class scores", ["teacher_map", "student_map"], (0, 1)),
            (f"val precision / recall of 'present' at tau ({fuse_with}, as fused)",
             [f"{fuse_with}_precision_at_tau", f"{fuse_with}_recall_at_tau"], (0, 1))]


def save_mlmt_curves(run_dir, fuse_with):
    """curves_mlmt.png over epochs: common.save_curves plots log.jsonl's "iter" (s4GAN's iterations), so it reads a
    copy of the MLMT lines with iter = epoch."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "log.jsonl"), "w") as f:
            f.writelines(json.dumps({**r, "iter": r["epoch"]}) + "\n" for r in recs if r.get("stage") == "mlmt")
        common.save_curves(tmp, mlmt_curves(fuse_with), os.path.join(run_dir, "curves_mlmt.png"))


# ================================================================================================================
# main
# ================================================================================================================
def run(argv=None):
    args = get_parser().parse_args(argv)
    resume_state = None
    if args.resume:
        run_dir = args.resume
        if not os.path.isfile(os.path.join(run_dir, "args.json")) or not any(
                os.path.isfile(os.path.join(run_dir, f)) for f in ("last.pt", "mlmt_last.pt")):
            raise DataError(f"--resume {run_dir}: no args.json with last.pt or mlmt_last.pt there; nothing to resume")
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
        keep = {k: getattr(args, k) for k in ("device", "workers", "stop_at", "compile", "benchmark",
                                              "peak_tflops")}   # where, how long and how fast: from now
        saved.setdefault("d_layers", 4)    # run folders from before --d-layers had the paper's D
        args = argparse.Namespace(**saved)
        args.__dict__.update(keep)
        args.workers = args.workers if args.workers is not None else saved["workers"]
        args.split, args.resume = os.path.join(run_dir, "labeled.txt"), run_dir
        if os.path.isfile(os.path.join(run_dir, "last.pt")):
            resume_state = torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu", weights_only=True)
    args = resolve_args(args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)    # denormal floats make CPU convolutions many times slower
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = not args.no_amp     # --no-amp: true float32, no TF32 matmuls either
        torch.backends.cudnn.allow_tf32 = not args.no_amp
        torch.cuda.set_device(device.index or 0)        # --device cuda:N: the CUDA context and pinned memory on GPU N
    do_s4gan, do_mlmt = args.stage in ("both", "s4gan"), args.stage in ("both", "mlmt")

    # data and split: every check that can fail on bad input runs before the run folder is made
    source = common.make_source(args.data, args.data_root, args.download, **SYNTHETIC_SIZE)
    class_names = source.CLASSES
    labeled, unlabeled = common.labeled_split(source.splits["train"], args.labeled, args.seed, args.split)
    scores = read_scores(args.mlmt_scores, source.splits["val"], class_names) if args.mlmt_scores else None
    if do_mlmt and args.data in ("cityscapes", "synthetic-cityscapes"):
        warnings.warn("the paper does not use MLMT on Cityscapes (Sec. 4.2.1: ineffective there)")
    if do_s4gan:
        # stride in the 3x3 conv for torchvision's weights, as they were trained (deviation 5)
        model = DeepLabV2(len(class_names), args.backbone, args.aspp_rates, args.aspp_branches,
                          stride_in_3x3=args.init == "imagenet" and not args.stride_in_1x1, width=args.width)
        D = Discriminator(len(class_names), args.ndf, args.official_dropout, args.d_layers)
        if resume_state is None:
            initialise(model, args)
        else:
            try:
                model.load_state_dict(resume_state["model"])
                D.load_state_dict(resume_state["D"])
            except RuntimeError as e:
                lines = str(e).splitlines()
                raise DataError(f"{args.resume}/last.pt does not fit the network of args.json: "
                                f"{lines[1].strip() if len(lines) > 1 else e}") from None
        model.to(device, memory_format=torch.channels_last)
        D.to(device, memory_format=torch.channels_last)
        opt_S, opt_D = make_optimizers(model, D, args)
        start = 0
        if resume_state is not None:
            opt_S.load_state_dict(resume_state["opt_S"])
            opt_D.load_state_dict(resume_state["opt_D"])
            start = resume_state["iteration"]
        streams, val_loader, normalize = build_data(args, source, labeled, unlabeled,
                                                    resume_state and resume_state["streams"])
        if resume_state is not None:           # after build_data: opening a DataLoader draws from the RNG
            torch.set_rng_state(resume_state["rng"])
            if device.type == "cuda" and resume_state["cuda_rng"].numel():
                torch.cuda.set_rng_state(resume_state["cuda_rng"], device)

    if args.resume is None:
        run_dir = args.out or os.path.join("runs", f"s4gan_mlmt_{args.data}_"
                                                   f"{os.path.basename(args.split) if args.split else args.labeled}"
                                                   f"_seed{args.seed}_{datetime.datetime.now():%Y%m%d-%H%M%S}")
        if any(os.path.exists(os.path.join(run_dir, f)) for f in ("last.pt", "mlmt_last.pt")):
            raise DataError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:                               # e.g. --out names an existing file
            raise DataError(f"--out {run_dir}: cannot make the run folder there ({e.strerror})") from None
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        common.write_list(os.path.join(run_dir, "labeled.txt"), labeled)
    print(f"run folder: {run_dir}")
    print("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(f"{len(labeled)} labeled / {len(unlabeled)} unlabeled train images; {len(source.splits['val'])} val images; "
          f"stage {args.stage}" + (f"; discriminator {'on' if use_D(args) else 'off'}; starting at iteration {start}"
                                   if do_s4gan else ""))

    metrics = {"labeled": len(labeled), "unlabeled": len(unlabeled)}
    if do_s4gan:
        if args.benchmark:    # README, "Throughput": timed training iterations only
            return common.benchmark(args, run_dir, streams, [model, D], args.num_steps,
                                    lambda i: train(args, run_dir, model, D, opt_S, opt_D,
                                                    streams, val_loader, i, class_names, scores))
        if args.compile:
            common.compile_modules([model, D], streams, args.batch_size)
        stop = train(args, run_dir, model, D, opt_S, opt_D, streams, val_loader, start, class_names, scores)
        common.save_curves(run_dir, CURVES)
        if stop < args.num_steps:
            print(f"stopped at iteration {stop} (--stop-at); continue with --resume {run_dir}")
            return None
        metrics["iteration"] = stop
        streams.clear()                        # their persistent workers end before MLMT's loaders start
    if do_mlmt:
        mlmt = train_mlmt(args, run_dir, source, labeled, unlabeled, class_names)
        save_mlmt_curves(run_dir, args.fuse_with)
        metrics["mlmt"] = {k: v for k, v in mlmt.items() if k != "scores"}
        scores = dict(zip(source.splits["val"], mlmt["scores"]))
    if do_s4gan:
        amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
        result, fused, pictures = evaluate(model, val_loader, len(class_names), device, amp, scores, args.tau,
                                           args.fuse_logits, args.num_pictures)
        if pictures:
            save_pictures(os.path.join(run_dir, "predictions.png"), pictures, normalize, common.palette(args.data),
                          class_names)
        print("s4GAN" + (" (left) and s4GAN + MLMT (right)" if fused else ""))
        print(format_tables(result, fused, class_names))
        write_log(run_dir, {"iter": stop, "val_miou": result["miou"],
                            **({"val_miou_fused": fused["miou"]} if fused else {})})
        common.save_curves(run_dir, CURVES)
        metrics.update({"miou": result["miou"], "pixel_acc": result["pixel_acc"], "mean_acc": result["mean_acc"],
                        "iou": dict(zip(class_names, result["iou"]))})
        if fused:
            metrics["fused"] = {"miou": fused["miou"], "pixel_acc": fused["pixel_acc"], "mean_acc": fused["mean_acc"],
                                "iou": dict(zip(class_names, fused["iou"])), "tau": args.tau,
                                "scores": args.mlmt_scores or os.path.join(run_dir, "mlmt_val_scores.csv"),
                                **({} if args.mlmt_scores else {"mlmt_network": args.fuse_with})}
    with open(os.path.join(run_dir, "metrics.json.tmp"), "w") as f:   # written last: its presence means "complete"
        json.dump(metrics, f, indent=1)
    os.replace(os.path.join(run_dir, "metrics.json.tmp"), os.path.join(run_dir, "metrics.json"))
    return metrics


def format_tables(result, fused, class_names):
    if fused is None:
        return common.format_iou_table(result, class_names)
    left = common.format_iou_table(result, class_names).splitlines()
    right = common.format_iou_table(fused, class_names).splitlines()
    return "\n".join(f"{a:<24}{b.split()[-1] if k else 'IoU fused'}" for k, (a, b) in enumerate(zip(left, right)))


def main(argv=None):
    """Command-line entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            return run(argv)
    except DataError as e:
        msg = str(e)
        if "Original Traceback" in msg:                      # raised inside a loader worker: keep its last line
            msg = msg.strip().splitlines()[-1].split("DataError: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
