"""Xu & Wang, "Semi-supervised semantic segmentation using an improved generative adversarial network", Journal of
Intelligent & Fuzzy Systems 40 (2021) 9709-9719, DOI 10.3233/JIFS-202220. No code was released.

Idea. Hung et al.'s adversarial set-up (hung2018.py) with a DeepLab-v3+ generator G and two discriminators. D2 is a
pixel-level encoder-decoder whose target is not "every generated pixel is fake" but the referenced confidence map
C_map (1 where G's argmax equals the ground truth), so that sigmoid(D2) estimates how likely each pixel is correct
(the paper's Fig. 2). D1 is an image-level discriminator whose probability for an unlabeled image is that image's
threshold on D2's map: the pixels where sigmoid(D2) > 1 - sigmoid(D1) (the "common trusted region"; direction:
deviation 5) get G's own argmax as pseudo label.

The paper's text lost every equation, figure and table (method card ../shared/methods/dual_disc.md, sec. 0). The
losses below are the card's reconstructions from the prose (R = reconstruction), means over the pixels that count:
    (R, card 6)  C_map  = 1[argmax G(X) == L] on labeled pixels with L != 255
    (R, card 6)  L_D2   = BCE(D2(G(X)), C_map) over valid pixels                      (G(X) detached)
    (R, card 4)  L_D1   = BCE(D1(Y_onehot), 1) + BCE(D1(G(X) * valid), 0)             (one logit per image)
    (R, card 7)  L_ad   = BCE(D2(G(X)), 1) over valid pixels + BCE(D1(G(X) * valid), 1)   (labeled images)
    (R, card 8)  L_s    = CE(G(X_u), argmax G(X_u)) over pixels with sigmoid(D2(G(X_u))) > 1 - sigmoid(D1(G(X_u)))
    (P)          L_G    = L_ce + lambda_ad L_ad + lambda_s L_s,  lambda_ad = 0.01, lambda_s = 0.1
Schedule (P): 5000 iterations on labeled images training G, D1 and D2; then D1 and D2 are fixed and G also learns
from unlabeled images. VOC: 20k iterations, batch 10, 321x321; Cityscapes: 40k, batch 2, 512x1024.

Reproduce the paper's VOC 1/8 setting (full method, Table 3's last row; numbers lost, see README):
    python dual_disc.py --data voc --data-root DATA/VOC --labeled 0.125
Table 3 ablations: `--ablation baseline | d2 | d1 | d1d2 | static | full` (default full). Table 6: `--d2-input`;
Table 7: `--d2-structure s1 | s2 | s3 | s4`. Fig. 2: calibration.png and metrics.json "calibration".

Deviations and choices (R: reconstruction of a lost equation or figure; H: inherited from Hung et al., on which the
paper says its experiments are based; methods/README rule 3 gives these hung2018.py's decisions and flag names):
 1. (R) C_map, L_D2, L_D1, L_ad, L_s as above (card 4-8). D2 sees no ground truth by default; `--d2-real-term` adds
    BCE(D2(Y_onehot), 1) (card 6, consistent with the definition since argmax Y = L).
 2. (R) D1 (not described): Hung's trunk (4x4/2 convs 64-128-256-512, LeakyReLU 0.2), a 4x4/2 conv to 1 channel and
    global average pooling -> one logit per image; `--d1-head fc` for GAP of the trunk + a linear layer (Hung's
    "no FCD" variant). D1's fake input is G(X) times the valid mask and its real input the same batch's one-hot
    ground truth (card 4 allows it), so void and padding pixels are zero on both sides and no real/fake cue. Where D1
    sets a threshold (unlabeled batches; the val diagnostic) there is no label, so its map is zeroed at padding only:
    `pad_mask` (padded pixels are exactly 0 in all three channels after normalisation, real ones never).
 3. (R) D2 (Table 7, figure lost): Hung's trunk as encoder; s4 (default, output stride 16, x4 up-sampling): a
    DeepLab-v3+-style decoder with the OS4 features as skip; s1, s2, s3 as card 5. Interpolation to exact sizes.
 4. (R) Table 6 input designs (figure lost), `--d2-input`: prob (default, C channels), prob_rgb (C + 3), label_rgb
    (one-hot argmax + RGB, C + 3; no gradient reaches G through it, so with D2 alone L_ad on unlabeled images is
    left out, with a warning), prob_x_rgb (each map times RGB, 3C).
 5. (R) Dynamic threshold direction (card 14 #6): trusted <=> sigmoid(D2) > 1 - sigmoid(D1), per image, so an image
    D1 finds fake gets a strict bar. The card's literal reading, sigmoid(D2) > sigmoid(D1) (`--threshold-mode d1`),
    trusts every pixel once D1 tells predictions from ground truth (sigmoid(D1) near 0 on predictions): L_s would be
    unfiltered self-training, against the paper's purpose, "a common region is used to obtain more reliable ground
    truth for unlabeled data". Measured on the synthetic preset (seed 0, val, when the warm-up ends; README): literal
    100% of pixels trusted, 80.9% correct inside = overall; 1 - D1: 33.7% trusted, 98.7% correct inside.
    `static` is Table 3's manual 0.9 (`--t-static`).
 6. (R) L_ad sums the D1 and D2 terms with equal weight, labeled images only (the prose names one lambda_ad);
    on unlabeled images it is Hung's lambda_adv = 0.001 (`--lambda-adv-unl`; methods/README's table for what this
    paper inherits; the card's 0 is overridden), from the end of the warm-up, when the paper's schedule first uses
    unlabeled images ("we first train the generator and discriminators with the labeled images for 5000
    iterations"), not Hung's iteration 0. Table 3's rows without the semi-supervised module use no unlabeled image.
 7. (P, card 10) D1 and D2 are trained on labeled batches only and fixed after the 5000-iteration warm-up;
    `--no-freeze-d-after-warmup` keeps training them on labeled batches. Labeled L_ce + lambda_ad L_ad continue
    after the warm-up (card 14 #10). Phase A never draws an unlabeled batch.
 8. (R) L_s: mean over the trusted pixels, 0 if there are none (Hung's convention); strict ">" as the card writes.
 9. (H) Losses are means over counted pixels; the Hung-style D of deviation 13 takes its ground truth from a
    separate stream over the labeled set, as hung2018.py; Adam betas (0.9, 0.99); poly decay 0.9 for G and the
    discriminators; 10x learning rate on the new head (ASPP + decoder); no mirroring on VOC; evaluation at 505x505
    (VOC) and 512x1024 (Cityscapes); bilinear up-sampling with align_corners=True.
10. (H, card 3) BatchNorm: backbone affine frozen; VOC (batch 10) uses batch statistics (Hung), Cityscapes (batch 2)
    frozen statistics, as card 3 says: "On Cityscapes (batch 2) freeze the BN statistics of the backbone (eval
    mode), as Hung froze BN." `--freeze-bn-stats` / `--no-freeze-bn-stats` switch it for every BN of G, the head's
    too: in train mode at batch 2 the ASPP image-pooling BN turns its 2 values per channel into exactly -1 and +1.
    Frozen head BNs keep their initial statistics (mean 0, variance 1) and learn only their scale and shift.
11. (D, card 3) DeepLab-v3+ (not in the paper's surviving text): torchvision ResNet-101 (ImageNet V1 weights) with
    layer4 dilated (output stride 16, `--output-stride 8` doubles the ASPP rates), torchvision's ASPP (1x1, rates
    6/12/18, image pooling; its dropout set to 0.1, card 14 #13), decoder 48-channel low-level + 2 x (3x3, 256).
12. (P) G: SGD lr 1e-3, momentum 0.9, weight decay 1e-4, as Sec. 4.1 states: "Stochastic Gradient Descent (SGD)
    [37] with momentum 0.9 and weight decay 10-4 is used as the optimizer". No Nesterov: the paper's own optimiser
    comes before Hung's Table 9 (`--nesterov` for Hung's). D1, D2: Adam lr 1e-4 (one Adam over both; Adam's update
    is per parameter, so this is the same as two). No code was released, so there is no `--official-quirks`.
13. (I) A Hung-style pixel discriminator (hung2018.py's FCDiscriminator, all fakes labeled 0) is trained beside D2 on
    the same detached predictions during the warm-up and never trains G: it only gives Fig. 2's comparison
    (`--no-calib-hung-d` saves its forward and backward passes). The calibration is measured when
    the warm-up ends (card 15.8; calibration_warmup.png) and at the end of training (calibration.png).
    A last partial batch of one image is dropped (the ASPP image-pooling BatchNorm cannot take it).
14. (I) Cityscapes as hung2018.py: images and labels resized to 512x1024, no crop, scale or mirroring.
15. The `synthetic` preset is not the paper's setting: DeepLab-v3+ on a 1-block-per-stage bottleneck ResNet
    ("resnet14", inner width 16), ASPP rates 1-3 with 64 channels, Adam 5e-4 without the 10x head, discriminators
    at width 16, 1,000 steps with the warm-up ending at 250 (the paper's 1/4); see PRESETS. Its pretrained start
    (`--init synthetic`, the stand-in for ImageNet weights) covers this whole network: it is the same DeepLab-v3+
    trained on other generated shapes (common.synthetic_pretrained), loaded except the class-specific classifier.
    The discriminators keep the paper's receptive field / crop ratio: D1 and the Hung-style D 3 stride-2 convs
    (22 px of 80, paper 94 of 321), D2 2 encoder convs (s4: 26 px of 80, paper 78 of 321); `--d1-layers`,
    `--d2-layers`, computed above the discriminators.
"""
import argparse
import datetime
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw

import common
from common import IGNORE, DataError

# ================================================================================================================
# Arguments. Defaults are the paper's (Sec. 4.1 "Implementation details"); `PRESETS` holds what differs per dataset.
# ================================================================================================================
PAPER = dict(
    backbone="resnet101", width_per_group=64, init="imagenet", output_stride=16,     # Sec. 3 / card 3
    aspp_rates=(6, 12, 18), aspp_channels=256, low_level_channels=48, decoder_channels=256, aspp_dropout=0.1,
    num_steps=20000, batch_size=10, crop_size=(321, 321), resize=None,              # Sec. 4.1
    random_scale=True, random_mirror=False,                                         # Sec. 4.1; Hung (dev. 9)
    optimizer="sgd", lr=1e-3, head_lr_mult=10, lr_d=1e-4, power=0.9, momentum=0.9,  # Sec. 4.1; Hung (dev. 9)
    weight_decay=1e-4, nesterov=False, ndf=64, freeze_bn_stats=False,               # Sec. 4.1 (dev. 12); dev. 10
    lambda_adv=0.01, lambda_adv_unl=0.001, lambda_semi=0.1, semi_start=5000,        # Sec. 4.1; dev. 6 (Hung)
    threshold_mode="one_minus_d1", t_static=0.9,                                    # dev. 5; Sec. 4.2
    d1_head="gap", d2_structure="s4", d2_input="prob", d1_layers=5, d2_layers=4,   # card 4-5; Tables 6-7
    d2_real_term=False, freeze_d_after_warmup=True, calib_hung_d=True,
    eval_pad=(505, 505), eval_batch_size=4, save_every=1000, eval_every=0, log_every=20)
PRESETS = {
    "voc": {},
    # Sec. 4.1: 512x1024, batch 2, 40k iterations; no crop, scale or flip (deviation 14)
    # and frozen BatchNorm statistics at batch 2 (card 3, deviation 10)
    "cityscapes": dict(num_steps=40000, batch_size=2, crop_size=None, resize=(512, 1024), random_scale=False,
                       eval_pad=None, eval_batch_size=2, freeze_bn_stats=True),
    # Not the paper's (deviation 15): the miniature protocol (README, "The synthetic miniature"), sized for a 2-core CPU
    # (README, "Datasets", Synthetic). 80x80 images give 5x5 features at output stride 16, so the ASPP rates are
    # scaled down from 6/12/18 to 1/2/3. The pretrained start is this same network trained on other generated shapes
    # (`--init synthetic`, common.synthetic_pretrained), the miniature's stand-in for ImageNet weights; Adam at 5e-4
    # as in hung2018.py's synthetic preset. Discriminator depths keep the paper's receptive field / crop ratio
    # (D1 and the Hung-style D 3 stride-2 convs, D2 2 encoder convs; computed above the discriminators).
    "synthetic": dict(backbone="resnet14", width_per_group=16, init="synthetic", aspp_rates=(1, 2, 3),
                      aspp_channels=64, low_level_channels=16, decoder_channels=64, num_steps=1000, batch_size=8,
                      crop_size=None, random_scale=False, random_mirror=True, optimizer="adam", lr=5e-4,
                      head_lr_mult=1, ndf=16, d1_layers=3, d2_layers=2, semi_start=250, eval_pad=None,
                      eval_batch_size=50, save_every=250, log_every=50),
}
# Table 3's rows: which discriminators exist, whether L_s is on and which threshold it uses (deviation 5). The rows
# without the semi-supervised module use no unlabeled image, so no L_ad on unlabeled images either (deviation 6).
NO_SEMI = dict(lambda_semi=0.0, lambda_adv_unl=0.0)
ABLATIONS = {
    "baseline": dict(d1=False, d2=False, **NO_SEMI),                # DeepLab-v3+ on labeled images only
    "d2": dict(d1=False, d2=True, **NO_SEMI),                       # + D2 (adversarial loss from D2)
    "d1": dict(d1=True, d2=False, **NO_SEMI),                       # D1 alone (Sec. 4.2: "small improvement")
    "d1d2": dict(d1=True, d2=True, **NO_SEMI),                      # + D1
    "static": dict(d1=False, d2=True, threshold_mode="static"),     # + semi-supervised, manual threshold 0.9
    "full": dict(d1=True, d2=True),                                 # + D1 as the dynamic threshold
}
SYNTHETIC_SIZE = dict(size=80, num_train=1000, num_val=200)
# Generated data at the paper's image size and class count (common.SyntheticSceneSource), trained with the paper's
# own preset: measures speed and memory at the paper's configuration with nothing to download (README, "Throughput").
PRESETS.update({"synthetic-voc": PRESETS["voc"], "synthetic-cityscapes": PRESETS["cityscapes"]})
BACKBONES = {"resnet101": [3, 4, 23, 3], "resnet50": [3, 4, 6, 3], "resnet14": [1, 1, 1, 1]}


class Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line, no usage dump
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def get_parser():
    p = Parser(description="Xu & Wang 2021: semi-supervised segmentation with one generator and two discriminators")
    a = p.add_argument
    a("--data", required=True, help="voc | cityscapes | synthetic | synthetic-voc | synthetic-cityscapes")
    a("--data-root", help="dataset folder (README, 'Datasets'); not needed for synthetic")
    a("--download", action="store_true", help="download VOC 2012 with torchvision first (SBD labels: see README)")
    a("--labeled", type=float, default=0.125, help="fraction of the train set that is labeled, in (0, 1]")
    a("--split", help="file of labeled ids (one per line) to reuse instead of drawing one")
    a("--seed", type=int, default=0, help="seed for the split, the initialisation and the data order")
    a("--out", help="run folder (default runs/dual_disc_<data>_<labeled>_seed<seed>_<time>)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (its own arguments are used)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=int, help="data loader processes per image stream (default: 0 on CPU; on CUDA the CPUs this "
                                  "process may use, less one, shared over the 2 image streams and 1 labels-only stream: "
                                  "common.default_workers); a labels-only stream gets min(N, 1)")
    a("--no-amp", action="store_true", help="float32 on CUDA instead of bf16 autocast")
    a("--compile", action="store_true", help="torch.compile the segmenter and the discriminator(s); partial "
      "batches are dropped (README, 'Throughput')")
    # generator G: DeepLab-v3+ (deviation 11)
    a("--backbone", choices=sorted(BACKBONES), help="paper: resnet101 (resnet14: synthetic preset only)")
    a("--width-per-group", type=int, help="torchvision's bottleneck inner width (64 in ResNet-50/101; synthetic 16)")
    a("--init", choices=["imagenet", "synthetic", "none"],
      help="imagenet: torchvision's ResNet weights (card 3); synthetic: this network pretrained on other generated "
           "shapes, the miniature's stand-in (built once, cached; all but the classifier loaded); none: random")
    a("--restore-from", help="path of torchvision ResNet weights for --init imagenet (default: download them)")
    a("--output-stride", type=int, choices=[8, 16], help="backbone output stride (card 3: 16)")
    a("--aspp-rates", type=int, nargs=3, help="ASPP rates at output stride 16 (DeepLab-v3+: 6 12 18)")
    a("--aspp-channels", type=int, help="ASPP and image-pooling channels (256)")
    a("--low-level-channels", type=int, help="decoder's reduced layer1 channels (48)")
    a("--decoder-channels", type=int, help="decoder's 3x3 conv channels (256)")
    a("--aspp-dropout", type=float, help="dropout after the ASPP projection (card 14 #13: 0.1)")
    a("--freeze-bn-stats", action=argparse.BooleanOptionalAction, default=None,
      help="every BN of G (backbone, ASPP incl. image pooling, decoder) in eval mode (default: VOC batch statistics "
           "as Hung; Cityscapes frozen, card 3)")
    # discriminators (card 4-5; Tables 6-7)
    a("--ablation", choices=list(ABLATIONS), default="full", help="Table 3 row (default: full method)")
    a("--ndf", type=int, help="discriminator width, channels of the first conv (Hung: 64)")
    a("--d1-head", choices=["gap", "fc"], help="D1's image-level head (deviation 2)")
    a("--d1-layers", type=int, choices=range(2, 7), metavar="{2..6}",
      help="stride-2 4x4 convs of D1 and of the Hung-style D, classifier included (Hung: 5; synthetic preset: 3, the "
           "paper's receptive field / crop ratio)")
    a("--d2-layers", type=int, choices=range(2, 7), metavar="{2..6}",
      help="D2's encoder convs e1..en (card 5: 4; synthetic preset: 2, the paper's receptive field / crop ratio)")
    a("--d2-structure", choices=["s1", "s2", "s3", "s4"], help="Table 7 structure (default s4: OS 16, x4)")
    a("--d2-input", choices=["prob", "prob_rgb", "label_rgb", "prob_x_rgb"], help="Table 6 design (default prob)")
    a("--d2-real-term", action="store_true", default=None, help="also train D2 on one-hot ground truth, target 1")
    a("--calib-hung-d", action=argparse.BooleanOptionalAction, default=None,
      help="train a Hung-style D beside D2 for Fig. 2's comparison (deviation 13)")
    # optimisation (Sec. 4.1)
    a("--num-steps", type=int, help="iterations (Sec. 4.1: VOC 20000, Cityscapes 40000)")
    a("--batch-size", type=int, help="images per batch, each of labeled/unlabeled/D's ground truth (VOC 10)")
    a("--crop-size", type=int, nargs=2, help="training crop H W (VOC 321 321)")
    a("--random-scale", action=argparse.BooleanOptionalAction, default=None, help="scale by 0.5..1.6 (Sec. 4.1)")
    a("--random-mirror", action=argparse.BooleanOptionalAction, default=None, help="horizontal flips")
    a("--optimizer", choices=["sgd", "adam"], help="optimizer of G (Sec. 4.1: SGD; synthetic preset: Adam)")
    a("--lr", type=float, help="G learning rate (Sec. 4.1: 1e-3)")
    a("--head-lr-mult", type=float, help="learning-rate factor of ASPP + decoder (Hung's code: 10)")
    a("--lr-d", type=float, help="D1 and D2 learning rate, Adam (Sec. 4.1: 1e-4)")
    a("--power", type=float, help="poly decay power (Hung: 0.9)")
    a("--momentum", type=float, help="SGD momentum (Sec. 4.1: 0.9)")
    a("--weight-decay", type=float, help="SGD weight decay (Sec. 4.1: 1e-4)")
    a("--nesterov", action=argparse.BooleanOptionalAction, default=None,
      help="Nesterov momentum (Sec. 4.1 names plain SGD with momentum 0.9: off; Hung Table 9: on)")
    # method (Sec. 3, 4.1)
    a("--lambda-adv", type=float, help="lambda_ad, weight of L_ad on labeled images (Sec. 4.1: 0.01)")
    a("--lambda-adv-unl", type=float,
      help="L_ad weight on unlabeled images after the warm-up (Hung, methods/README table: 0.001; card 7: 0)")
    a("--lambda-semi", type=float, help="lambda_s, weight of L_s (Sec. 4.1: 0.1)")
    a("--semi-start", type=int, help="labeled-only warm-up; then D1, D2 fixed and L_s on (Sec. 4.1: 5000)")
    a("--threshold-mode", choices=["d1", "one_minus_d1", "static"],
      help="trusted where sigmoid(D2) > 1 - sigmoid(D1) (default), > sigmoid(D1) (d1, the literal reading) or "
           "> --t-static (deviation 5)")
    a("--t-static", type=float, help="static threshold of Table 3's row without D1 (Sec. 4.2: 0.9)")
    a("--freeze-d-after-warmup", action=argparse.BooleanOptionalAction, default=None,
      help="fix D1 and D2 after the warm-up (Sec. 4.1; deviation 7)")
    # run
    a("--eval-every", type=int, help="evaluate every N iterations (0: only at the end)")
    a("--eval-full-res", action="store_true", help="Cityscapes: evaluate against the 1024x2048 labels")
    a("--eval-batch-size", type=int)
    a("--log-every", type=int, help="print and log every N iterations (the only host-device sync in the loop)")
    a("--save-every", type=int, help="write last.pt every N iterations")
    a("--stop-at", type=int, help="stop after this many iterations with a checkpoint (continue with --resume)")
    a("--benchmark", type=int, metavar="N", help="time N training iterations after a warm-up, write benchmark.json; "
      "no evaluation, pictures or checkpoints (README, 'Throughput')")
    a("--peak-tflops", type=float, help="the device's dense bf16 peak for --benchmark (default: a table of known GPUs)")
    a("--num-pictures", type=int, default=4, help="val images drawn into predictions.png")
    return p


def resolve_args(args):
    """Fill every unset option: explicit flag > --ablation > dataset preset > paper default; then check them."""
    if args.data not in PRESETS:
        raise DataError(f"unknown --data {args.data!r}; choose one of: {', '.join(PRESETS)}")
    if not args.split and not (0 < args.labeled <= 1):
        raise DataError(f"--labeled must be a fraction in (0, 1], got {args.labeled}")
    merged = {**PAPER, **PRESETS[args.data], **ABLATIONS[args.ablation]}
    for k, v in merged.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("crop_size", "resize", "eval_pad", "aspp_rates"):
        if getattr(args, k) is not None:
            setattr(args, k, tuple(getattr(args, k)))
    if args.lambda_semi > 0 and not args.d2:
        raise DataError(f"--ablation {args.ablation} has no D2, so there is no trusted region for --lambda-semi")
    if args.lambda_semi > 0 and args.threshold_mode != "static" and not args.d1:
        raise DataError(f"--threshold-mode {args.threshold_mode} needs D1, which --ablation {args.ablation} "
                        f"does not have; use --threshold-mode static")
    if args.lambda_semi > 0 and args.semi_start < 1 and args.freeze_d_after_warmup:
        raise DataError("--semi-start 0 with frozen discriminators: D1 and D2 would set thresholds untrained")
    if args.lambda_adv_unl > 0 and not (args.d1 or args.d2):
        raise DataError(f"--lambda-adv-unl needs a discriminator; --ablation {args.ablation} has none")
    if args.lambda_adv_unl > 0 and not adv_unl_reaches_G(args):
        warnings.warn(f"--lambda-adv-unl {args.lambda_adv_unl}: no gradient reaches G from --ablation {args.ablation} "
                      f"with --d2-input label_rgb (an argmax), so L_ad on unlabeled images is left out")
    if args.batch_size < 2:
        raise DataError("--batch-size must be at least 2: the ASPP image-pooling branch has a BatchNorm over 1x1 maps")
    if not 0 < args.t_static < 1:
        raise DataError(f"--t-static must be in (0, 1), got {args.t_static}")
    if args.benchmark is not None and (args.benchmark < 1 or args.resume):
        raise DataError("--benchmark N times N >= 1 iterations of a new run (not with --resume)")
    if args.workers is None:
        args.workers = common.default_workers(args.device, image_streams=2, label_streams=1)
    return args


# ================================================================================================================
# Generator G: DeepLab-v3+ (Chen et al. 2018; card 3) from torchvision's ResNet and ASPP
# ================================================================================================================
class DeepLabV3Plus(nn.Module):
    """torchvision ResNet (layer4 dilated: output stride 16; layer3 too for 8), torchvision's ASPP (1x1, three 3x3
    rates, image pooling, 1x1 projection, BN + ReLU everywhere), then the v3+ decoder: layer1 reduced to 48 channels,
    concatenated with the ASPP output up-sampled to stride 4, two 3x3 convs, a 1x1 classifier. Returns logits at
    stride 4, (N, C, H/4, W/4)."""

    def __init__(self, num_classes, backbone="resnet101", width_per_group=64, output_stride=16,
                 aspp_rates=(6, 12, 18), aspp_channels=256, low_level_channels=48, decoder_channels=256,
                 aspp_dropout=0.1):
        super().__init__()
        dilate = [False, False, True] if output_stride == 16 else [False, True, True]
        self.backbone = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, BACKBONES[backbone],
                                                         width_per_group=width_per_group,
                                                         replace_stride_with_dilation=dilate)
        del self.backbone.fc, self.backbone.avgpool                 # classification head: not used
        self.backbone_name = backbone
        rates = [r * 16 // output_stride for r in aspp_rates]       # card 3: 12/24/36 at output stride 8
        self.aspp = torchvision.models.segmentation.deeplabv3.ASPP(2048, rates, aspp_channels)
        self.aspp.project[3] = nn.Dropout(aspp_dropout)             # torchvision: 0.5; DeepLab-v3+: 0.1 (dev. 11)
        self.reduce = nn.Sequential(nn.Conv2d(256, low_level_channels, 1, bias=False),
                                    nn.BatchNorm2d(low_level_channels), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Conv2d(aspp_channels + low_level_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels), nn.ReLU(inplace=True),
            nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        for m in self.backbone.modules():                           # deviation 10: backbone BN affine frozen
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def head_parameters(self):
        return [p for m in (self.aspp, self.reduce, self.decoder, self.classifier) for p in m.parameters()]

    def forward(self, x):                                           # (N, 3, H, W)
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))                    # (N, 64, H/4, W/4)
        low = b.layer1(x)                                           # (N, 256, H/4, W/4)
        x = b.layer4(b.layer3(b.layer2(low)))                       # (N, 2048, H/16, W/16)
        x = up(self.aspp(x), low.shape[-2:])                        # (N, 256, H/4, W/4)
        x = self.decoder(torch.cat([x, self.reduce(low)], 1))       # (N, 256, H/4, W/4)
        return self.classifier(x)                                   # (N, C, H/4, W/4)


# ================================================================================================================
# Discriminators (card 4-5). All three use Hung's trunk: 4x4 stride-2 convs, LeakyReLU 0.2, no BatchNorm.
# ================================================================================================================
# Depth (deviation 15; methods/README rule 4: the miniature keeps the paper's ratio of a discriminator's receptive
# field, RF, to the training crop, as hung2018.py's D: 94 px of 321, 3 layers: 22 px of 80). Counted in input pixels:
# a 4x4 stride-2 conv adds 3 steps of its input grid, a 3x3 conv 2, a bilinear up-sampling 1 step of its coarse grid
# (two taps); after e1, e2, e3, e4 a step is 2, 4, 8, 16 px. The last up-sampling to the input size, which no conv
# follows, is not counted (nor is it in Hung's 94 px). n stride-2 4x4 convs see 1 + 3 (2^n - 1) px: 4, 10, 22, 46, 94.
#   D1, `--d1-layers` n (gap head: its conv stack before pooling is Hung's D): paper n = 5: 94 px of 321 = 29.3%;
#       80 px: n = 2: 10 px = 12.5%, n = 3: 22 px = 27.5%, n = 4: 46 px = 57.5%  -> 3. With `--d1-head fc` the
#       pooled stack is the trunk, n - 1 convs: paper 46 / 321 = 14.3%; n = 3: 10 / 80 = 12.5% -> the same 3. The
#       Hung-style comparison D (deviation 13) is the same stack and takes the same n.
#   D2, `--d2-layers` n (encoder e1..en):
#       s4 (default): e_n, up to e2's grid (+2^n; none for n = 2), two 3x3 convs at OS 4 (+16):
#           paper n = 4: 46 + 16 + 16 = 78 px of 321 = 24.3%; 80 px: n = 2: 10 + 16 = 26 px = 32.5%,
#           n = 3: 22 + 8 + 16 = 46 px = 57.5%  -> 2. At n = 2 the bottleneck is e2 itself (OS 4): the decoder then
#           reads e2 twice (deep path and 1x1 skip); s4 at 80 px cannot keep both its OS 16 and the paper's ratio.
#       s1: e_n and a 3x3 conv at OS 2^n: paper 46 + 32 = 78 (24.3%); n = 2: 18 (22.5%), n = 3: 38 (47.5%) -> 2.
#       s2: e1, e2 stride 2, e3..en 3x3 stride 1 at OS 4, a 3x3 conv: paper 10 + 8 + 8 + 8 = 34 (10.6%);
#           n = 2: 18 (22.5%), n = 3: 26 (32.5%) -> 2.
#       s3: e_n, then for e_{n-1} .. e1 up (+1 coarse step) and a 3x3 conv, up to H x W and a 3x3 conv:
#           1 + 3 (2^n - 1) + 4 (2^n - 2) + 4: paper 106 (33.0%); n = 2: 22 (27.5%), n = 3: 50 (62.5%) -> 2.
#           (Measured, the field snaps to whole e_n cells, since the up-samplings only interpolate between them:
#           94-110 px on 321, 46-54 on 80 at n = 3; the choice stays 2.)
#   So one value per discriminator fits every head and structure: synthetic preset d1_layers=3, d2_layers=2
#   (test_smoke measures these receptive fields from gradients).
def conv_lrelu(cin, cout, k=4, stride=2):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=1 if k in (3, 4) else 0),
                         nn.LeakyReLU(0.2, inplace=True))


class ImageDiscriminator(nn.Module):
    """D1 (deviation 2): Hung's trunk, a 4x4/2 conv to one channel, global average pooling: one logit per image.
    `head="fc"`: global average pooling of the trunk's 512 channels and a linear layer instead. `layers` counts the
    stride-2 convs with the classifier (paper 5: trunk of 4, 64-128-256-512; the linear layer takes the classifier's
    place with `fc`); the synthetic preset uses 3 (receptive fields above)."""

    def __init__(self, in_channels, ndf=64, head="gap", layers=5):
        super().__init__()
        chans = [in_channels] + [ndf * 2 ** k for k in range(layers - 1)]
        self.trunk = nn.Sequential(*[conv_lrelu(chans[k], chans[k + 1]) for k in range(layers - 1)])
        self.head = head
        self.classifier = (nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1) if head == "gap"
                           else nn.Linear(chans[-1], 1))

    def forward(self, x):                                           # (N, C, H, W)
        x = self.trunk(x)                                           # paper: (N, 512, H/16, W/16)
        if self.head == "gap":
            return self.classifier(x).float().mean((1, 2, 3))       # (N,) logits, averaged in float32
        return self.classifier(x.mean((2, 3)))[:, 0]                # (N,)


class PixelDiscriminator(nn.Module):
    """D2 (deviation 3, card 5): encoder e1-e4 (output stride 2, 4, 8, 16) and one of Table 7's decoders. Returns a
    logit map at the input size, (N, 1, H, W).
      s1: OS 16, x16: a 3x3 conv on e4, bilinear to H x W.
      s2: OS 4, x4: e3 and e4 are 3x3 stride-1 convs (features stay at OS 4), a 3x3 conv, bilinear to H x W.
      s3: OS 16, x2 per stage (U-Net-like): up x2, concatenate the skip (e3, e2, e1), 3x3 conv, four times.
      s4: OS 16, x4 (DeepLab-v3+-like, default): e4 up to e2's size, concatenated with e2 reduced to 48 channels,
          two 3x3 convs and a 1x1 conv at OS 4, bilinear to H x W.
    `layers` n: encoder e1..en (paper 4; synthetic preset 2, receptive fields above), channels ndf * 2^(k-1), the
    decoders as above with e_n for e4 (s3: one stage per skip e_{n-1}..e1)."""

    def __init__(self, in_channels, ndf=64, structure="s4", layers=4):
        super().__init__()
        self.structure, self.layers = structure, layers
        ch = [in_channels] + [ndf * 2 ** k for k in range(layers)]          # ch[k]: channels of e_k
        for k in range(1, layers + 1):                                      # e1 ... e4 for the paper's D2
            k_s = (3, 1) if structure == "s2" and k > 2 else (4, 2)
            setattr(self, f"e{k}", conv_lrelu(ch[k - 1], ch[k], *k_s))
        if structure in ("s1", "s2"):
            self.classifier = nn.Conv2d(ch[-1], 1, 3, padding=1)
        elif structure == "s3":
            for k in range(layers - 1, 0, -1):                              # d3, d2, d1 for the paper's D2
                setattr(self, f"d{k}", conv_lrelu(ch[k + 1] + ch[k], ch[k], 3, 1))
            self.classifier = nn.Conv2d(ndf, 1, 3, padding=1)
        else:
            self.skip = conv_lrelu(ndf * 2, ndf * 3 // 4, 1, 1)    # 128 -> 48 at ndf 64
            self.decoder = nn.Sequential(conv_lrelu(ch[-1] + ndf * 3 // 4, ndf * 4, 3, 1),
                                         conv_lrelu(ndf * 4, ndf * 4, 3, 1))
            self.classifier = nn.Conv2d(ndf * 4, 1, 1)

    def forward(self, x):                                           # (N, C_in, H, W)
        size = x.shape[-2:]
        e = [x]
        for k in range(1, self.layers + 1):                         # paper: e1 (N, 64, H/2, W/2), e2 (N, 128, H/4,
            e.append(getattr(self, f"e{k}")(e[-1]))                 # W/4), e3 (N, 256, H/8), e4 (N, 512, H/16);
        if self.structure in ("s1", "s2"):                          # s2: e3, e4 stay at H/4
            return up(self.classifier(e[-1]).float(), size)         # (N, 1, H, W), float32 under autocast
        if self.structure == "s3":
            d = e[-1]
            for k in range(self.layers - 1, 0, -1):                 # paper: (N, 256, H/8), (N, 128, H/4), (N, 64, H/2)
                d = getattr(self, f"d{k}")(torch.cat([up(d, e[k].shape[-2:]), e[k]], 1))
            return self.classifier(up(d, size)).float()             # (N, 1, H, W)
        d = torch.cat([up(e[-1], e[2].shape[-2:]), self.skip(e[2])], 1)   # (N, 560, H/4, W/4)
        return up(self.classifier(self.decoder(d)).float(), size)   # (N, 1, H, W)


class FCDiscriminator(nn.Module):
    """Hung et al.'s discriminator (hung2018.py), here only for Fig. 2's comparison (deviation 13): five 4x4/2 convs
    {64, 128, 256, 512, 1}, LeakyReLU 0.2; logits at about 1/32, up-sampled to the input size by the caller.
    `layers`: the number of those convs (D1's stack; synthetic preset 3, as hung2018.py's)."""

    def __init__(self, num_classes, ndf=64, layers=5):
        super().__init__()
        chans = [num_classes] + [ndf * 2 ** k for k in range(layers - 1)]
        self.net = nn.Sequential(*[conv_lrelu(chans[k], chans[k + 1]) for k in range(layers - 1)],
                                 nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1))

    def forward(self, x):
        return up(self.net(x).float(), x.shape[-2:])                # (N, 1, H, W)


def build_discriminators(num_classes, args):
    """nn.ModuleDict with d1, d2 and hung as the ablation and --calib-hung-d ask; empty for the baseline."""
    d2_in = {"prob": num_classes, "prob_rgb": num_classes + 3, "label_rgb": num_classes + 3,
             "prob_x_rgb": 3 * num_classes}[args.d2_input]
    D = nn.ModuleDict()
    if args.d1:
        D["d1"] = ImageDiscriminator(num_classes, args.ndf, args.d1_head, args.d1_layers)
    if args.d2:
        D["d2"] = PixelDiscriminator(d2_in, args.ndf, args.d2_structure, args.d2_layers)
        if args.calib_hung_d:
            D["hung"] = FCDiscriminator(num_classes, args.ndf, args.d1_layers)
    return D


def d2_input(prob, image, design):
    """Table 6 (deviation 4): what D2 sees, from a probability or one-hot map (N, C, H, W) and the image
    (N, 3, H, W)."""
    if design == "prob":
        return prob                                                          # (N, C, H, W)
    if design == "prob_rgb":
        return torch.cat([prob, image], 1)                                   # (N, C+3, H, W)
    if design == "label_rgb":
        return torch.cat([one_hot(prob.argmax(1), prob.shape[1]), image], 1)  # (N, C+3, H, W), no gradient
    return (prob[:, :, None] * image[:, None]).flatten(1, 2)                  # (N, 3C, H, W)


def up(x, size):
    """Bilinear up-sampling with align_corners=True (Hung's code), to an exact size (card 5)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def one_hot(label, num_classes):
    """(N, H, W) -> (N, C, H, W) float; ignore pixels (255) become all-zero vectors (card 2)."""
    return (label[:, None] == torch.arange(num_classes, device=label.device)[None, :, None, None]).float()


# ================================================================================================================
# Losses (card 6-9). Means over the counted pixels (deviation 9); max(count, 1) keeps an empty set at 0, not NaN,
# and nothing here needs a host-device sync.
# ================================================================================================================
def masked_mean(x, mask):
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def bce(z, target, mask=None):
    """Binary cross-entropy on logits z against a target (a number or a tensor like z); mean over `mask`."""
    target = torch.full_like(z, float(target)) if not torch.is_tensor(target) else target.to(z.dtype)
    loss = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    return loss.mean() if mask is None else masked_mean(loss, mask)


# (R, card 6): C_map = 1[argmax G(X) == L]; undefined (ignored) where L == 255
def c_map(pred, label):
    """Returns (C_map (N, H, W) float, valid mask (N, H, W) bool)."""
    return (pred.argmax(1) == label).float(), label != IGNORE


# (R, card 6): L_D2 = -mean_valid [C_map log sigmoid(D2) + (1 - C_map) log(1 - sigmoid(D2))]
def loss_D2(z2, cmap, valid):
    return bce(z2[:, 0], cmap, valid)


# (R, card 4): L_D1 = -[log sigmoid(D1(Y)) + log(1 - sigmoid(D1(G(X) * valid)))], each a mean over the batch
def loss_D1(z1_real, z1_fake):
    return bce(z1_real, 1) + bce(z1_fake, 0)


# Hung et al. Eq. (1), for the comparison D only: every generated pixel is fake (0), every ground-truth pixel real
def loss_D_hung(zh_fake, fake_valid, zh_real, real_valid):
    return 0.5 * bce(zh_fake[:, 0], 0, fake_valid) + 0.5 * bce(zh_real[:, 0], 1, real_valid)


# Eq. L_ce (Hung Eq. (3)): -sum_{h,w} sum_c Y log G(X), over pixels with L != 255
def loss_ce(pred, label):
    loss = F.cross_entropy(pred, label, ignore_index=IGNORE, reduction="none")   # 0 at ignored pixels
    return loss.sum() / (label != IGNORE).sum().clamp(min=1)


# (R, card 7): L_ad = -mean_valid log sigmoid(D2(G(X))) - log sigmoid(D1(G(X) * valid)); either term may be absent
def loss_adv(z1, z2, valid=None):
    """Returns (L_ad, D1 term, D2 term); z1 (N,) or None, z2 (N, 1, H, W) or None, valid (N, H, W) or None."""
    l1 = bce(z1, 1) if z1 is not None else None
    l2 = bce(z2[:, 0], 1, valid) if z2 is not None else None
    return sum(t for t in (l1, l2) if t is not None), l1, l2


# Padding without labels. In this project's pipeline (common.TrainTransform, common.EvalTransform) padded image pixels
# are exactly 0.0 in all three channels after normalisation, and a real pixel never is: an 8-bit value v becomes
# (v / 255 - mean) / std (imagenet) or v - mean (caffe), and no mean is a multiple of 1/255 (0.485, 0.456, 0.406 are
# 123.675, 116.28, 103.53 / 255) or an integer (104.008, 116.669, 122.679), so no channel of a real pixel is 0
# (a test checks all 256 values). Rescaling happens on the 8-bit image before normalisation.
def pad_mask(x):
    """(N, 3, H, W) normalised images -> (N, H, W) bool: True at image pixels, False at padding."""
    return (x != 0).any(1)


# D1's logits on images without labels: the map zeroed at padding, as D1's fakes were zeroed at void and padding
# during training (deviation 2), so padding does not move the threshold. Used in training and in evaluate().
def d1_unlabeled(d1, prob, x):
    return d1(prob * pad_mask(x)[:, None]).float()                  # (N,)


# (R, card 8): per-image threshold T_u = 1 - sigmoid(D1(G(X_u))) (deviation 5; "d1": sigmoid(D1), "static": 0.9),
# shape (N, 1, 1)
def threshold(z1_u, mode, t_static):
    if mode == "static":
        return t_static
    t = torch.sigmoid(z1_u.detach()).view(-1, 1, 1)
    return t if mode == "d1" else 1 - t


# (R, card 8): L_s = masked CE on argmax G(X_u) over the trusted region sigmoid(D2(G(X_u))) > T_u; mask and
# pseudo label are constants, only log G(X_u) carries a gradient
def loss_semi(pred_u, z2_u, t_u):
    """Returns (L_s averaged over the trusted pixels, trusted-region mask (N, H, W))."""
    trusted = torch.sigmoid(z2_u.detach())[:, 0] > t_u
    pseudo = pred_u.detach().argmax(1).masked_fill(~trusted, IGNORE)
    return loss_ce(pred_u, pseudo), trusted


# (P): L_G = L_ce + lambda_ad L_ad + lambda_s L_s. The loop back-propagates the unlabeled and the labeled parts
# separately (as hung2018.py); their gradients add up before one step.
def loss_G(loss_ce, loss_ad, loss_s, lambda_ad, lambda_s):
    return loss_ce + lambda_ad * loss_ad + lambda_s * loss_s


# ================================================================================================================
# Optimisation (Sec. 4.1): SGD for G with 10x learning rate on the new head (Hung), Adam for D1 and D2, poly decay
# ================================================================================================================
def make_optimizers(model, D, args):
    head = set(id(p) for p in model.head_parameters())
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    groups = [dict(params=backbone), dict(params=model.head_parameters())]
    if args.optimizer == "adam":  # synthetic preset (deviation 15): chosen from scratch, where SGD was far slower
        opt_S = torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt_S = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                nesterov=args.nesterov)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.9, 0.99)) if len(D) else None   # Hung's betas
    return opt_S, opt_D


def poly_lr(opt_S, opt_D, i, args):
    """lr_i = lr * (1 - i/T)^0.9 (Hung), the head at 10x; the same decay for the discriminators."""
    f = (1 - i / args.num_steps) ** args.power
    opt_S.param_groups[0]["lr"], opt_S.param_groups[1]["lr"] = args.lr * f, args.head_lr_mult * args.lr * f
    for g in (opt_D.param_groups if opt_D else []):
        g["lr"] = args.lr_d * f


def set_train_mode(model, freeze_bn_stats):
    """Whole model in train mode (batch statistics, Hung's code); `--freeze-bn-stats`: every BatchNorm of G in eval
    mode, the head's included (at batch 2 the image-pooling BN in train mode normalises 2 values per channel to
    exactly -1 and +1). The head's BNs then keep their initial statistics (mean 0, variance 1): their affine
    parameters still learn a scale and shift per channel."""
    model.train()
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# Parts of G a pretrained file may fill, by name prefix; `classifier` (the class-specific 1x1 conv) always starts fresh
G_PARTS = (("backbone", ("backbone.",)), ("ASPP", ("aspp.",)), ("decoder", ("reduce.", "decoder.")))


def load_pretrained(model, state, source):
    """Copy tensors into G by name and shape. A torchvision ResNet file (conv1.weight, layer1.0..., fc.*) fills the
    backbone, its `fc` dropped, ASPP and decoder fresh; a file of this DeepLabV3Plus (backbone.*, aspp.*, reduce.*,
    decoder.*, classifier.*; `--init synthetic`) fills backbone, ASPP and decoder, which were pretrained with the same
    shapes. The classifier, the only class-specific layer, is never loaded. A tensor of another shape, a missing or
    an unknown one is an error. Returns the loaded names."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):    # common.synthetic_pretrained's file
        state = state["state_dict"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items() if torch.is_tensor(v)}
    whole = any(k.startswith("backbone.") for k in state)
    if not whole:                                                  # a torchvision ResNet: the backbone alone
        state = {"backbone." + k: v for k, v in state.items()}
    parts = G_PARTS if whole else G_PARTS[:1]
    own = model.state_dict()
    in_part = lambda k, ps: any(k.startswith(p) for _, prefixes in ps for p in prefixes)
    target = [k for k in own if in_part(k, parts)]
    dropped = sorted(k for k in state if k.startswith(("backbone.fc.", "classifier.")))   # class-specific layers
    wrong = [k for k in target if k in state and state[k].shape != own[k].shape]
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target and k not in dropped]
    if wrong or missing or unexpected:
        kind = (f"a DeepLab-v3+ of this shape (--backbone {model.backbone_name}, --width-per-group, --output-stride, "
                f"--aspp-*, --*-channels)" if whole else f"a torchvision {model.backbone_name}")
        raise DataError(f"{source} is not {kind}: other shapes {wrong[:3]}, missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    loaded = [k for k in target if k in state]
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(state[k])
    n = lambda names, ps: sum(in_part(k, [(None, ps)]) for k in names)
    counts = ", ".join(f"{name} {n(loaded, ps)}/{n(own, ps)}" for name, ps in G_PARTS)
    print(f"loaded {len(loaded)} tensors of G from {source} ({counts}; tensors by name and shape); not loaded: "
          f"{', '.join(dropped) or 'none'}; the classifier (class-specific) starts fresh"
          f"{'' if whole else ', and so do ASPP and decoder'}")
    return loaded


def initialise(model, args):
    """`--init imagenet`: torchvision's ImageNet ResNet weights into the backbone (its `fc` is dropped; the head stays
    fresh). `--init synthetic`: the miniature's pretrained start, this same network trained on other generated
    shapes (common.synthetic_pretrained, built once and cached), loaded except its classifier."""
    if args.init == "none":
        return
    if args.init == "synthetic":
        src = common.synthetic_pretrained(
            f"dual_disc-{args.backbone}-wpg{args.width_per_group}-os{args.output_stride}"
            f"-aspp{'.'.join(map(str, args.aspp_rates))}x{args.aspp_channels}"
            f"-ll{args.low_level_channels}-dec{args.decoder_channels}",
            lambda c: DeepLabV3Plus(c, args.backbone, args.width_per_group, args.output_stride, args.aspp_rates,
                                    args.aspp_channels, args.low_level_channels, args.decoder_channels,
                                    args.aspp_dropout),
            common.Normalize("imagenet"), args.device)           # build_data's normalisation
        load_pretrained(model, torch.load(src, map_location="cpu", weights_only=True), src)
        return
    if args.backbone not in ("resnet50", "resnet101") or args.width_per_group != 64:
        raise DataError(f"--init imagenet needs --backbone resnet50/resnet101 at --width-per-group 64 "
                        f"(torchvision has no weights for {args.backbone} at width {args.width_per_group}); "
                        f"use --init none (or --init synthetic)")
    weights = {"resnet50": torchvision.models.ResNet50_Weights,
               "resnet101": torchvision.models.ResNet101_Weights}[args.backbone].IMAGENET1K_V1
    src = args.restore_from or weights.url
    try:
        if os.path.isfile(src):
            state = torch.load(src, map_location="cpu", weights_only=True)
        elif "://" in src:
            state = torch.hub.load_state_dict_from_url(src, map_location="cpu", weights_only=True, progress=True)
        else:
            raise DataError(f"--restore-from {src!r} does not exist")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not load weights from {src}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}; "
                        f"download {weights.url} by hand and pass --restore-from PATH") from None
    load_pretrained(model, state, src)


# ================================================================================================================
# Data: three endless streams (Hung): labeled images, unlabeled images, labeled ground truth for the Hung-style D
# ================================================================================================================
def build_data(args, source, labeled, unlabeled, stream_states=None):
    normalize = common.Normalize("imagenet")               # torchvision weights: RGB, ImageNet mean/std
    # min_batch 2: a last partial batch of one image would break the image-pooling branch's BatchNorm
    scales = [0.5 + k / 10 for k in range(12)] if args.random_scale else None      # Hung: {0.5, ..., 1.6}
    train_tf = common.TrainTransform(normalize, args.crop_size, scales, args.random_mirror, args.resize)
    label_tf = common.LabelTransform(args.crop_size, scales, args.random_mirror, args.resize)
    eval_tf = common.EvalTransform(normalize, args.eval_pad, args.resize, args.eval_full_res)
    pin = args.device.startswith("cuda")
    states = stream_states or {}
    # one persistent loader per stream; a labels-only stream needs about a tenth of an image stream's CPU
    make = lambda name, ds, k: common.InfiniteLoader(ds, args.batch_size, args.seed * 3 + k,
                                                     min(args.workers, 1) if ds.labels_only else args.workers, pin,
                                                     states.get(name, (0, 0)), min_batch=2, device=args.device)
    streams = {"labeled": make("labeled", common.SegDataset(source, labeled, train_tf, args.seed), 0)}
    if use_unlabeled(args, unlabeled):
        streams["unlabeled"] = make("unlabeled", common.SegDataset(source, unlabeled, train_tf, args.seed + 1), 1)
    if args.d2 and args.calib_hung_d:
        streams["gt"] = make("gt", common.SegDataset(source, labeled, label_tf, args.seed + 2, labels_only=True), 2)
    val = common.EvalLoader(common.SegDataset(source, source.splits["val"], eval_tf), args.eval_batch_size,
                            args.workers, args.device)
    return streams, val, normalize


def adv_unl_reaches_G(args):
    """Whether L_ad on unlabeled images can train G: D1's term always can; D2's not through --d2-input label_rgb
    (an argmax has no gradient)."""
    return args.lambda_adv_unl > 0 and (args.d1 or (args.d2 and args.d2_input != "label_rgb"))


def use_unlabeled(args, unlabeled):
    return (len(unlabeled) > 0 and args.semi_start < args.num_steps
            and (args.lambda_semi > 0 or adv_unl_reaches_G(args)))


# ================================================================================================================
# Training (card 10): phase A (i < semi_start) labeled only, G, D1, D2 trained; phase B: D1, D2 fixed, G also on L_s
# ================================================================================================================
LOG_KEYS = ("loss_ce", "loss_adv", "loss_adv_d1", "loss_adv_d2", "loss_adv_u", "loss_semi", "loss_D1", "loss_D2",
            "loss_D_hung", "D1_real", "D1_fake", "D2_real", "D2_conf", "C_map", "threshold", "trusted")


def train(args, run_dir, model, D, opt_S, opt_D, streams, val_loader, normalize, start, class_names):
    device = torch.device(args.device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
    C = len(class_names)
    d1, d2, dh = D["d1"] if "d1" in D else None, D["d2"] if "d2" in D else None, D["hung"] if "hung" in D else None
    stop = min(args.num_steps, args.stop_at or args.num_steps)
    sums = torch.zeros(len(LOG_KEYS), device=device)     # running sums on the device, read every --log-every
    counts = [0] * len(LOG_KEYS)

    def acc(key, value):
        k = LOG_KEYS.index(key)
        sums[k] += value.detach().float()
        counts[k] += 1

    def to_dev(t, image=False):       # batches arrive on the device, normalised, labels int64 (common.InfiniteLoader)
        return t.contiguous(memory_format=torch.channels_last) if image else t

    set_train_mode(model, args.freeze_bn_stats)
    D.train()
    t_last, i_last, images = time.time(), start, 0
    log_path = os.path.join(run_dir, "log.jsonl")

    def write_log(rec):
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    for i in range(start, stop):
        warm = i < args.semi_start                           # phase A: labeled images only (Sec. 4.1)
        train_D = len(D) > 0 and (warm or not args.freeze_d_after_warmup)
        poly_lr(opt_S, opt_D, i, args)
        opt_S.zero_grad(set_to_none=True)
        if opt_D:
            opt_D.zero_grad(set_to_none=True)
        D.requires_grad_(False)                              # L_G must not update D1 or D2 (card 7)

        # (1) generator on an unlabeled batch (phase B): lambda_s L_s over the common trusted region (+ L_ad_u)
        if "unlabeled" in streams and not warm:
            x_u = to_dev(next(streams["unlabeled"])[0], image=True)   # its labels are never read
            adv_u = adv_unl_reaches_G(args)                           # deviation 6
            with torch.autocast(**amp):
                pred_u = up(model(x_u).float(), x_u.shape[-2:])       # (N, C, H, W) logits
                p_u = F.softmax(pred_u, 1)
                p_in = p_u if adv_u else p_u.detach()                 # no graph through D1, D2 unless L_ad_u
                need_d1 = d1 is not None and (args.threshold_mode != "static" or adv_u)
                z1_u = d1_unlabeled(d1, p_in, x_u) if need_d1 else None   # (N,): the thresholds, padding masked
                z2_u = d2(d2_input(p_in, x_u, args.d2_input)).float() if d2 is not None else None   # (N, 1, H, W)
            loss_u = 0
            if args.lambda_semi > 0:
                t_u = threshold(z1_u, args.threshold_mode, args.t_static)
                l_semi, trusted = loss_semi(pred_u, z2_u, t_u)
                loss_u = loss_u + args.lambda_semi * l_semi
                acc("loss_semi", l_semi), acc("trusted", trusted.float().mean())
                if torch.is_tensor(t_u):
                    acc("threshold", t_u.mean())
            if adv_u:                                                # deviation 6 (label_rgb-only D2: skipped)
                l_adv_u = loss_adv(z1_u, z2_u)[0]
                loss_u = loss_u + args.lambda_adv_unl * l_adv_u
                acc("loss_adv_u", l_adv_u)
            loss_u.backward()
            images += x_u.shape[0]

        # (2) generator on a labeled batch: L_ce + lambda_ad L_ad (D1 sees the map with void pixels zeroed)
        x, y, _ = next(streams["labeled"])
        x, y = to_dev(x, image=True), to_dev(y)
        valid = y != IGNORE
        adv_on = args.lambda_adv > 0 and (d1 is not None or d2 is not None)
        with torch.autocast(**amp):
            pred = up(model(x).float(), y.shape[-2:])               # (N, C, H, W) logits
            p = F.softmax(pred, 1)
            z1 = d1(p * valid[:, None]).float() if adv_on and d1 is not None else None
            z2 = d2(d2_input(p, x, args.d2_input)).float() if adv_on and d2 is not None else None
        l_ce = loss_ce(pred, y)
        l_adv, l_adv1, l_adv2 = loss_adv(z1, z2, valid) if adv_on else (0, None, None)
        loss_G(l_ce, l_adv, 0, args.lambda_adv, 0).backward()
        acc("loss_ce", l_ce)
        for key, value in (("loss_adv", l_adv if adv_on else None), ("loss_adv_d1", l_adv1), ("loss_adv_d2", l_adv2)):
            if value is not None:
                acc(key, value)
        images += x.shape[0]

        # (3) discriminators on the labeled batch (phase A; always with --no-freeze-d-after-warmup)
        if train_D:
            D.requires_grad_(True)
            p_fake = p.detach()
            l_D = 0
            y_gt = to_dev(next(streams["gt"])) if "gt" in streams else None   # Hung-style D's real maps
            with torch.autocast(**amp):
                if d1 is not None:
                    z1_fake = d1(p_fake * valid[:, None]).float()   # real and fake share the void mask (dev. 2)
                    z1_real = d1(one_hot(y, C)).float()
                if d2 is not None:
                    z2_fake = d2(d2_input(p_fake, x, args.d2_input)).float()
                    z2_real = d2(d2_input(one_hot(y, C), x, args.d2_input)).float() if args.d2_real_term else None
                if dh is not None:
                    zh_fake, zh_real = dh(p_fake).float(), dh(one_hot(y_gt, C)).float()
            if d1 is not None:
                l_D1 = loss_D1(z1_real, z1_fake)
                l_D = l_D + l_D1
                acc("loss_D1", l_D1), acc("D1_real", torch.sigmoid(z1_real).mean())
                acc("D1_fake", torch.sigmoid(z1_fake).mean())
            if d2 is not None:
                cmap, _ = c_map(pred.detach(), y)
                l_D2 = loss_D2(z2_fake, cmap, valid)
                if z2_real is not None:                               # deviation 1: optional real term
                    l_D2 = l_D2 + bce(z2_real[:, 0], 1, valid)
                    acc("D2_real", masked_mean(torch.sigmoid(z2_real)[:, 0], valid))
                l_D = l_D + l_D2
                acc("loss_D2", l_D2), acc("C_map", masked_mean(cmap, valid))
                acc("D2_conf", masked_mean(torch.sigmoid(z2_fake)[:, 0], valid))
            if dh is not None:
                l_Dh = loss_D_hung(zh_fake, valid, zh_real, y_gt != IGNORE)
                l_D = l_D + l_Dh
                acc("loss_D_hung", l_Dh)
            l_D.backward()

        opt_S.step()
        if train_D:
            opt_D.step()

        it = i + 1
        if it % args.log_every == 0 or it == stop:
            values = (sums / torch.tensor([max(c, 1) for c in counts], device=device)).tolist()   # the one sync
            dt = time.time() - t_last
            rec = {"iter": it, **{k: round(v, 5) for k, v, c in zip(LOG_KEYS, values, counts) if c},
                   "img_per_s": round(images / dt, 1), "lr": opt_S.param_groups[0]["lr"]}
            eta = (args.num_steps - it) * dt / max(it - i_last, 1)
            mem = f" mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f}G" if device.type == "cuda" else ""
            if device.type == "cuda":
                rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            print(f"[{it}/{args.num_steps}] " + " ".join(f"{k} {rec[k]:.4f}" for k in LOG_KEYS if k in rec) +
                  f" | {rec['img_per_s']} img/s{mem} | ETA {datetime.timedelta(seconds=int(eta))}", flush=True)
            write_log(rec)
            sums.zero_()
            counts = [0] * len(LOG_KEYS)
            t_last, i_last, images = time.time(), it, 0
        if not args.benchmark and (it % args.save_every == 0 or it == stop):   # --benchmark: no checkpoint
            save_checkpoint(run_dir, it, model, D, opt_S, opt_D, streams)
        if it == args.semi_start and len(D) and it < args.num_steps and not args.benchmark:   # card 15.8
            with torch.random.fork_rng(devices=[]):
                _, calib, _ = evaluate(model, D, val_loader, C, device, amp, 0, args)
            with open(os.path.join(run_dir, "calibration_warmup.json"), "w") as f:
                json.dump(calib, f, indent=1)
            set_train_mode(model, args.freeze_bn_stats)
            D.train()
        if args.eval_every and it % args.eval_every == 0 and it < args.num_steps:
            with torch.random.fork_rng(devices=[]):              # the val loader draws from the global RNG
                result, _, _ = evaluate(model, D, val_loader, C, device, amp, 0, args, calibrate=False)
            write_log({"iter": it, "val_miou": result["miou"]})
            print(f"[{it}] val mIoU {100 * result['miou']:.2f}", flush=True)
            set_train_mode(model, args.freeze_bn_stats)
            D.train()
    return stop


def save_checkpoint(run_dir, it, model, D, opt_S, opt_D, streams):
    """last.pt, written atomically: everything needed to continue exactly (the split is labeled.txt beside it). The
    global RNG state is kept for the ASPP dropout."""
    device = next(model.parameters()).device              # the run's own GPU only: it may resume with fewer visible
    state = {"iteration": it, "model": model.state_dict(), "D": D.state_dict(), "opt_S": opt_S.state_dict(),
             "opt_D": opt_D.state_dict() if opt_D else {}, "streams": {k: s.state() for k, s in streams.items()},
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0)}
    tmp = os.path.join(run_dir, "last.pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(run_dir, "last.pt"))


# ================================================================================================================
# Evaluation: mIoU (single scale, whole image, VOC padded to 505x505) and Fig. 2's calibration of the confidence maps
# ================================================================================================================
FINE_BINS, PLOT_BINS = 1000, 10


class Calibration:
    """Histograms, on the device, of a confidence in [0, 1] over valid val pixels, split by whether G's prediction
    is correct there. From them: Fig. 2 (share of correct / incorrect pixels per confidence bin), accuracy per bin,
    expected calibration error (ECE, 10 bins) and the AUROC of the confidence as a detector of correct pixels."""

    def __init__(self, device):
        self.hist = torch.zeros(2, FINE_BINS, dtype=torch.float64, device=device)   # [incorrect, correct]
        self.conf_sum = torch.zeros(2, FINE_BINS, dtype=torch.float64, device=device)

    def update(self, conf, correct, valid):
        c, w = conf.flatten().double(), valid.flatten().double()     # void pixels weigh 0: no boolean indexing,
        idx = correct.flatten().long() * FINE_BINS + (c * FINE_BINS).long().clamp(0, FINE_BINS - 1)   # no sync
        self.hist.view(-1).index_add_(0, idx, w)
        self.conf_sum.view(-1).index_add_(0, idx, c * w)

    def compute(self):
        h, s = self.hist.cpu().numpy(), self.conf_sum.cpu().numpy()
        n_wrong, n_right = h.sum(1)
        hb = h.reshape(2, PLOT_BINS, -1).sum(2)                      # (2, 10)
        sb = s.reshape(2, PLOT_BINS, -1).sum(2)
        nb = hb.sum(0)
        acc_b = np.where(nb > 0, hb[1] / np.maximum(nb, 1), np.nan)
        conf_b = np.where(nb > 0, sb.sum(0) / np.maximum(nb, 1), np.nan)
        ece = float(np.nansum(nb / max(nb.sum(), 1) * np.abs(acc_b - conf_b)))
        # AUROC = P(conf of a correct pixel > conf of an incorrect one), ties within a fine bin counted 1/2
        below_wrong = np.cumsum(h[0]) - h[0]
        auroc = (float((h[1] * (below_wrong + 0.5 * h[0])).sum() / (n_right * n_wrong))
                 if n_wrong and n_right else None)
        return {"ece": ece, "auroc": auroc,
                "mean_conf_correct": float(s[1].sum() / max(n_right, 1)),
                "mean_conf_incorrect": float(s[0].sum() / max(n_wrong, 1)),
                "bin_edges": [k / PLOT_BINS for k in range(PLOT_BINS + 1)],
                "share_of_correct": (hb[1] / max(n_right, 1)).round(5).tolist(),     # Fig. 2 "TPred"
                "share_of_incorrect": (hb[0] / max(n_wrong, 1)).round(5).tolist(),   # Fig. 2 "FPred"
                "accuracy_per_bin": [None if np.isnan(a) else round(float(a), 5) for a in acc_b],
                "pixels_per_bin": nb.astype(int).tolist()}


@torch.no_grad()
def evaluate(model, D, loader, num_classes, device, amp, num_pictures, args, calibrate=True):
    """Returns (mIoU result, calibration dict, pictures). Calibration: D2's sigmoid, the Hung-style D's sigmoid and,
    as a reference that needs no discriminator, G's own max softmax probability; plus the trusted region on val.
    `calibrate=False` (in-loop evaluation): mIoU only."""
    model.eval()
    D.eval()
    cm = common.ConfusionMatrix(num_classes, device)
    d1, d2, dh = (D[k] if k in D else None for k in ("d1", "d2", "hung"))
    calib = {k: Calibration(device) for k in ("d2", "hung", "softmax") if k in D or k == "softmax"}
    trusted_counts = torch.zeros(4, dtype=torch.float64, device=device)   # trusted, trusted & correct, valid, correct
    pictures = []
    for x, y, _ in loader:
        with torch.autocast(**amp):
            pred = up(model(x).float(), y.shape[-2:])        # logits up-sampled to the label's size
        cm.update(pred.argmax(1), y)
        if not calibrate:
            continue
        p = F.softmax(pred, 1)
        correct, valid = c_map(pred, y)
        correct = correct.bool()
        xs = up(x, y.shape[-2:]) if x.shape[-2:] != y.shape[-2:] else x    # Cityscapes --eval-full-res
        conf = {"softmax": p.max(1)[0]}
        with torch.autocast(**amp):
            if d2 is not None:
                conf["d2"] = torch.sigmoid(d2(d2_input(p, xs, args.d2_input)).float())[:, 0]
            if dh is not None:
                conf["hung"] = torch.sigmoid(dh(p).float())[:, 0]
            t = (threshold(d1_unlabeled(d1, p, xs), args.threshold_mode, args.t_static) if d1 is not None
                 else args.t_static)                          # as in training: D1 sees no padding (deviation 2)
        for k, c in calib.items():
            c.update(conf[k], correct, valid)
        if d2 is not None:
            trusted = conf["d2"] > t
            trusted_counts += torch.stack([(trusted & valid).sum(), (trusted & valid & correct).sum(), valid.sum(),
                                           (valid & correct).sum()]).double()
        for k in range(min(num_pictures - len(pictures), x.shape[0])):
            pictures.append(dict(x=xs[k].cpu(), y=y[k].cpu(), pred=pred[k].argmax(0).cpu(),
                                 correct=torch.where(valid[k], correct[k].float(), 0.5).cpu(),
                                 **{f"conf_{n}": v[k].float().cpu() for n, v in conf.items() if n != "softmax"},
                                 **({"trusted": trusted[k].float().cpu()} if d2 is not None else {})))
    out = {k: c.compute() for k, c in calib.items()}
    if d2 is not None:
        n_t, n_tc, n_v, n_c = trusted_counts.tolist()
        out["trusted_region"] = {"threshold_mode": args.threshold_mode if d1 is not None else "static",
                                 "fraction_of_pixels": n_t / max(n_v, 1), "accuracy_inside": n_tc / max(n_t, 1),
                                 "accuracy_outside": (n_c - n_tc) / max(n_v - n_t, 1),
                                 "accuracy_all": n_c / max(n_v, 1)}
    return cm.compute(), out, pictures


PICTURE_MAPS = (("conf_d2", "sigmoid(D2): 0 dark, 1 bright"), ("trusted", "trusted region (bright)"),
                ("conf_hung", "Hung-style D: 0 dark, 1 bright"))


def save_pictures(path, pictures, normalize, pal, class_names):
    """One row per val image: image, ground truth, prediction, correctness (C_map: white correct, black wrong, grey
    void), D2's confidence, the trusted region, the Hung-style D's confidence (dark: low, bright: high); column
    titles above, the class colours below."""
    rows = []
    for pic in pictures:
        img = common.denormalize(pic["x"], normalize)
        row = [img, common.colorize(pic["y"].numpy(), pal), common.colorize(pic["pred"].numpy(), pal),
               np.repeat((pic["correct"].numpy()[..., None] * 255).astype(np.uint8), 3, 2)]
        row += [common.heatmap(pic[k].numpy()) for k, _ in PICTURE_MAPS if k in pic]
        rows.append(row)
    titles = ["image", "ground truth", "prediction", "C_map: white right, black wrong"]
    titles += [t for k, t in PICTURE_MAPS if k in pictures[0]]
    scale = max(1, 256 // rows[0][0].shape[0])               # small synthetic images: enlarge for the eye
    rows = [[np.kron(im, np.ones((scale, scale, 1), np.uint8)) for im in r] for r in rows]
    common.save_labeled_grid(path, rows, titles, class_names, pal)


# curves.png: G's losses, the discriminators' losses, their mean outputs with the trusted-pixel share, val mIoU
CURVES = [("G: L_ce and L_s (mean per logged interval)", ["loss_ce", "loss_semi"], None),
          ("G: L_ad (labeled), its D1 and D2 terms; L_ad on unlabeled images",
           ["loss_adv", "loss_adv_d1", "loss_adv_d2", "loss_adv_u"], None),
          ("discriminator losses (D1, D2 against C_map, Hung-style D)", ["loss_D1", "loss_D2", "loss_D_hung"], None),
          ("mean sigmoid(D1) on GT / predictions, sigmoid(D2) vs C_map; threshold, trusted share",
           ["D1_real", "D1_fake", "D2_real", "D2_conf", "C_map", "threshold", "trusted"], (0, 1)),
          ("val mIoU", ["val_miou"], None)]


def save_calibration(path, calib):
    """The paper's Fig. 2 for each confidence map: per confidence bin, the share of all correctly (green) and of all
    incorrectly (red) predicted val pixels that fall in it; below it, accuracy per bin against the diagonal."""
    names = [k for k in ("hung", "d2", "softmax") if k in calib]
    titles = {"hung": "Hung-style D (all fakes 0)", "d2": "D2 (target C_map)", "softmax": "G's max softmax"}
    pw, ph, m = 300, 170, 40
    img = Image.new("RGB", (len(names) * (pw + m) + m, 2 * (ph + m) + m), "white")
    dr = ImageDraw.Draw(img)
    for j, name in enumerate(names):
        c = calib[name]
        x0 = m + j * (pw + m)
        auroc = c["auroc"] if c["auroc"] is None else round(c["auroc"], 3)
        head = f"share of correct (green) / wrong (red) pixels\nECE {c['ece']:.3f}, AUROC {auroc}"
        panels = ((head, [(c["share_of_correct"], (40, 160, 60)), (c["share_of_incorrect"], (200, 50, 50))]),
                  ("accuracy per bin", [(c["accuracy_per_bin"], (70, 90, 200))]))
        for r, (label, series) in enumerate(panels):
            y0 = m + r * (ph + m)
            dr.text((x0, y0 - 38 if r == 0 else y0 - 14), (titles[name] + "\n" if r == 0 else "") + label, fill="black")
            dr.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
            top = max([v for s, _ in series for v in s if v is not None] + [1e-9]) if r == 0 else 1.0
            bw = pw / PLOT_BINS
            for k in range(PLOT_BINS):
                for s_idx, (s, colour) in enumerate(series):
                    v = s[k]
                    if v is None:
                        continue
                    width = bw / len(series)
                    bx = x0 + k * bw + s_idx * width
                    dr.rectangle([bx + 1, y0 + ph - ph * v / top, bx + width - 1, y0 + ph], fill=colour)
            if r == 1:
                dr.line([x0, y0 + ph, x0 + pw, y0], fill=(150, 150, 150))       # perfect calibration
            for k in (0, 5, 10):
                dr.text((x0 + k * bw - 6, y0 + ph + 3), f"{k / 10:.1f}", fill="black")
    img.save(path)


# ================================================================================================================
# main
# ================================================================================================================
def run(argv=None):
    args = get_parser().parse_args(argv)
    resume_state = None
    if args.resume:
        run_dir = args.resume
        ckpt = os.path.join(run_dir, "last.pt")
        if not os.path.isfile(ckpt) or not os.path.isfile(os.path.join(run_dir, "args.json")):
            raise DataError(f"--resume {run_dir}: no last.pt and args.json there; nothing to resume")
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
        keep = {k: getattr(args, k) for k in ("device", "workers", "stop_at", "compile", "benchmark",
                                              "peak_tflops")}   # where, how long and how fast: from now
        saved.setdefault("d1_layers", 5)   # run folders from before the depth flags had the paper's Ds
        saved.setdefault("d2_layers", 4)
        args = argparse.Namespace(**saved)
        args.__dict__.update(keep)
        args.workers = args.workers if args.workers is not None else saved["workers"]
        args.split, args.resume = os.path.join(run_dir, "labeled.txt"), run_dir
        resume_state = torch.load(ckpt, map_location="cpu", weights_only=True)
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

    # data and split: every check that can fail on bad input runs before the run folder is made
    source = common.make_source(args.data, args.data_root, args.download, **SYNTHETIC_SIZE)
    class_names = source.CLASSES
    labeled, unlabeled = common.labeled_split(source.splits["train"], args.labeled, args.seed, args.split)
    model = DeepLabV3Plus(len(class_names), args.backbone, args.width_per_group, args.output_stride, args.aspp_rates,
                          args.aspp_channels, args.low_level_channels, args.decoder_channels, args.aspp_dropout)
    D = build_discriminators(len(class_names), args)
    if resume_state is None:
        initialise(model, args)
    else:
        try:
            model.load_state_dict(resume_state["model"])
            D.load_state_dict(resume_state["D"])
        except RuntimeError as e:
            raise DataError(f"{args.resume}/last.pt does not fit the network of args.json: "
                            f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    model.to(device, memory_format=torch.channels_last)
    D.to(device, memory_format=torch.channels_last)
    opt_S, opt_D = make_optimizers(model, D, args)
    start = 0
    if resume_state is not None:
        opt_S.load_state_dict(resume_state["opt_S"])
        if opt_D:
            opt_D.load_state_dict(resume_state["opt_D"])
        start = resume_state["iteration"]
    streams, val_loader, normalize = build_data(args, source, labeled, unlabeled,
                                                resume_state and resume_state["streams"])
    if resume_state is not None:
        torch.set_rng_state(resume_state["rng"])            # after the loaders, which draw from it when opened
        cuda_rng = resume_state.get("cuda_rng", torch.zeros(0))
        if isinstance(cuda_rng, list):                    # older last.pt: every visible GPU's state; this GPU's
            cuda_rng = cuda_rng[device.index or 0] if (device.index or 0) < len(cuda_rng) else torch.zeros(0)
        if device.type == "cuda" and cuda_rng.numel():
            torch.cuda.set_rng_state(cuda_rng, device)     # the ASPP dropout on the GPU

    if args.resume is None:
        run_dir = args.out or os.path.join("runs", f"dual_disc_{args.data}_{os.path.basename(args.split) if args.split else args.labeled}"
                                                   f"_seed{args.seed}_{datetime.datetime.now():%Y%m%d-%H%M%S}")
        if os.path.exists(os.path.join(run_dir, "last.pt")):
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
    print(f"{len(labeled)} labeled / {len(unlabeled)} unlabeled train images"
          f"{'' if 'unlabeled' in streams else ' (unlabeled images unused)'}; {len(source.splits['val'])} val images; "
          f"discriminators: {', '.join(D.keys()) or 'none'}; starting at iteration {start}")

    if args.benchmark:    # README, "Throughput": timed training iterations only
        return common.benchmark(args, run_dir, streams, list(D.values()), args.num_steps,
                                lambda i: train(args, run_dir, model, D, opt_S, opt_D,
                                                streams, val_loader, normalize, i, class_names))
    if args.compile:
        common.compile_modules(list(D.values()), streams, args.batch_size)
    stop = train(args, run_dir, model, D, opt_S, opt_D, streams, val_loader, normalize, start, class_names)
    common.save_curves(run_dir, CURVES)
    if stop < args.num_steps:
        print(f"stopped at iteration {stop} (--stop-at); continue with --resume {run_dir}")
        return None

    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
    result, calib, pictures = evaluate(model, D, val_loader, len(class_names), device, amp, args.num_pictures, args)
    if pictures:
        save_pictures(os.path.join(run_dir, "predictions.png"), pictures, normalize, common.palette(args.data),
                      class_names)
    if "d2" in calib:
        save_calibration(os.path.join(run_dir, "calibration.png"), calib)
    warm_path = os.path.join(run_dir, "calibration_warmup.json")
    calib_warm = None
    if os.path.isfile(warm_path):                        # the same, measured when D1 and D2 were fixed
        with open(warm_path) as f:
            calib_warm = json.load(f)
        if "d2" in calib_warm:
            save_calibration(os.path.join(run_dir, "calibration_warmup.png"), calib_warm)
    print(common.format_iou_table(result, class_names))
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"iter": stop, "val_miou": result["miou"]}) + "\n")
    common.save_curves(run_dir, CURVES)
    for k in ("d2", "hung", "softmax"):
        if k in calib:
            c = calib[k]
            auroc = float("nan") if c["auroc"] is None else c["auroc"]
            print(f"calibration {k:8s}: ECE {c['ece']:.3f}  AUROC {auroc:.3f}  mean confidence "
                  f"on correct {c['mean_conf_correct']:.3f} / incorrect {c['mean_conf_incorrect']:.3f} pixels")
    if "trusted_region" in calib:
        t = calib["trusted_region"]
        print(f"trusted region on val ({t['threshold_mode']}): {100 * t['fraction_of_pixels']:.1f}% of pixels, "
              f"accuracy {100 * t['accuracy_inside']:.1f}% inside vs {100 * t['accuracy_outside']:.1f}% outside")
    metrics = {"miou": result["miou"], "pixel_acc": result["pixel_acc"], "mean_acc": result["mean_acc"],
               "iou": dict(zip(class_names, result["iou"])), "iteration": stop,
               "labeled": len(labeled), "unlabeled": len(unlabeled), "calibration": calib,
               "calibration_after_warmup": calib_warm}
    with open(os.path.join(run_dir, "metrics.json.tmp"), "w") as f:   # written last: its presence means "complete"
        json.dump(metrics, f, indent=1)
    os.replace(os.path.join(run_dir, "metrics.json.tmp"), os.path.join(run_dir, "metrics.json"))
    return metrics


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
