"""Sawatzky, Zatsarynna, Gall, "Discovering Latent Classes for Semi-Supervised Semantic Segmentation" (GCPR 2020,
arXiv 1912.12936).

Idea. Hung et al.'s adversarial set-up (hung2018.py) gets a second head on the shared DeepLab-v2 backbone that
predicts L latent classes. On labeled images the latent head is trained, without any latent labels, to make the
batch-wise conditional entropy H(C | L) of the true classes given the latent classes small: each latent class becomes
a data-driven super-category. A running co-occurrence matrix M gives P(l | c), which maps the semantic prediction into
latent space; on unlabeled images the mapped semantic prediction is trained to agree with the latent head.

Losses (means over the pixels that count; method card ../shared/methods/latent_classes.md, sec. 3):
    Eq. (1)-(3)  L_latent = H(C | L) = -sum_{c,l} P_b(c, l) log P_b(c | l), P_b(c, l) = mean of Y_onehot * S_l
    Eq. (4)      L_ce     = cross-entropy(S_c(X), Y) over pixels with Y != 255
    Eq. (5)      L_adv    = BCE(D(S_c(X)), 1): labeled (Y != 255 pixels) and unlabeled (all pixels) images
    Eq. (6)      L_labeled   = L_ce + lambda_latent L_latent + lambda_adv L_adv           (1.0, 0.01)
    Eq. (7)      S_hat(l) = sum_c P(l | c) S_c(c)         (P(l | c) a constant)
    Eq. (8)-(9)  M = (1 - alpha) M + alpha sum_pixels Y_onehot S_l^T (labeled, detached);  P(l | c) = M / row sum
    Eq. (10)     L_cons   = -mean_pixels sum_l S_l log S_hat       (unlabeled, from iteration 5000)
    Eq. (11)     L_unlabeled = lambda_adv_u L_adv_u + lambda_cons L_cons                 (0.001, 0.1)
    Eq. (12)     L_D      = BCE(D(S_c(X)), 0) on labeled and unlabeled predictions + BCE(D(Y_onehot), 1), each 1/2

Reproduce the paper's VOC 1/8 number (71.3 mIoU, Table 1; average of 5 seeds) with the COCO-pretrained DeepLab-v2:
    python latent_classes.py --data voc --data-root DATA/VOC --labeled 0.125
Ablations: Table 3 baseline `--lambda-latent 0 --lambda-cons 0 --lambda-adv 0 --lambda-adv-unl 0`; "+ latent
classes" `--lambda-adv 0 --lambda-adv-unl 0`; Table 4 `--num-latent 2|4|6|10|20|50`. Table 5 is not implemented.

Deviations and choices (paper / Hung's released code, which this paper kept / this script; card sec. 10):
 1. Losses are means over counted pixels (paper: sums), as in Hung's code, whose lambdas the paper kept.
 2. Consistency gradient (card sec. 4): the paper says once that it reaches "only the latent branch", which
    contradicts its abstract, introduction and Figs. 2-3. Default: S_l is the (detached) soft label and the gradient
    reaches the semantic head and the backbone. `--cons-grad latent` is the literal sentence, `both` detaches nothing.
 3. P_b(c, l) is divided by N*H*W, void pixels included, as Eq. (2) writes it (default). `--latent-norm valid`
    divides by the valid pixels (card's recommendation: then P_b sums to 1); a per-batch factor on L_latent.
 4. alpha = batch size / number of *labeled* images (paper: "images in the data set"); `--alpha-denominator all`.
 5. log(0): 1e-8 inside every log and denominator, so classes absent from a batch give no NaN; classes never seen
    have a uniform row P(l | c) = 1/L; M is float64, updated from iteration 0 and saved in last.pt.
 6. L_latent, M and L_cons at full crop resolution after bilinear upsampling (paper: predictions are upsampled).
 7. Latent head `layer6`: a second ASPP like `layer5`, fresh N(0, 0.01) init, 10x learning rate like `layer5`;
    never loaded from a checkpoint. Only `layer5` is used at test time.
 8. Unlabeled L_adv from iteration 0 (Hung's code); only L_cons waits 5000 iterations. Hung's L_semi is not used.
    As in Hung's code the unlabeled batch runs through S at every iteration from `--semi-start-adv` (Hung's flag),
    also when lambda_adv_u = 0 and L_cons has not started ("+ latent classes"): BN statistics and D's fakes see it.
 9. D's fakes: labeled and unlabeled semantic predictions (paper: "labeled and unlabeled data"), the real maps a
    separate stream of labeled ground truth, each half weighted 1/2 (Hung's code).
10. Shared with hung2018.py, same defaults and flags (methods/README rule 3); the quirks of Hung's released code,
    which this paper's authors very likely inherited, are flags that `--official-quirks` turns on together: weight
    decay 5e-4 (default 1e-4), no Nesterov, the 2-branch ASPP bug in both heads (`--aspp-branches 2`), 3-4 SGD
    sub-steps per backbone weight with PyTorch 0.4's in-place weight decay, which accumulates over them
    (`--official-optimizer`), RGB fed to the Caffe COCO weights (`--rgb-input`), float32 (`--no-amp`; TF32 off too,
    `--amp` keeps bf16 under the quirks). Each quirk flag has a `--no-` form. BN: affine frozen, batch statistics
    (Hung's code; `--freeze-bn-stats` for frozen statistics, not a quirk).
11. Random scaling and mirroring on (this paper, Sec. 4.1; hung2018.py follows Hung: no mirroring, and its
    `--official-quirks` also drops scaling, which Hung's released command did; this paper states it, so not here).
12. Cityscapes: images and labels resized to 512x1024, then random scale, 505x505 crops and mirroring; evaluation at
    512x1024 against nearest-resized labels (`--eval-full-res` for 1024x2048). The paper does not give the base size.
13. The `synthetic` preset is not the paper's setting: ResNet-18 at width 32, ASPP rates 1-4, Adam (lr 5e-4, no 10x
    heads), D at width 16 with 3 stride-2 convs, 1,000 steps, L_cons from step 250 (the paper's 1/4), L = 20 (see
    PRESETS). Its pretrained start (`--init synthetic`) stands in for COCO: this network with a semantic head only,
    trained once on other generated shapes (common.synthetic_pretrained; README, 'The synthetic miniature'), loaded
    like any checkpoint, both heads fresh. D's depth keeps the paper's receptive field / crop ratio: 5 convs see
    94 px of a 321 px crop (29%); on 80 px images 3 convs see 22 px (28%), `--d-layers`.
14. As in hung2018.py: upsampling to (H, W) (Hung's code: (W, H), which only matters for non-square crops), and
    `--init imagenet` puts the stride in the 3x3 conv as torchvision trained it, with ImageNet normalisation.
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
from PIL import Image, ImageDraw

import common
from common import IGNORE, DataError

EPS = 1e-8   # inside every log and denominator of Eqs. (1)-(3), (9), (10) (card 10.4)

# ================================================================================================================
# Arguments. Defaults are the paper's (it keeps Hung et al.'s); `PRESETS` holds what differs per dataset.
# ================================================================================================================
COCO_URL = "http://vllab1.ucmerced.edu/~whung/adv-semi-seg/resnet101COCO-41f33a49.pth"   # Hung's released init
PAPER = dict(
    backbone="resnet101", width=64, init="coco", aspp_rates=(6, 12, 18, 24),   # DeepLab-v2, Sec. 3 / card 5
    num_steps=20000, batch_size=10, crop_size=(321, 321), resize=None,          # Sec. 4.1 (Hung's schedule)
    random_scale=True, random_mirror=True,                                      # Sec. 4.1
    optimizer="sgd", lr=2.5e-4, head_lr_mult=10, lr_d=1e-4, power=0.9, momentum=0.9,   # Sec. 4.1, card 6.1
    weight_decay=1e-4, nesterov=True, ndf=64, d_layers=5,                       # deviation 10; D: card 5.4
    num_latent=20, lambda_latent=1.0, lambda_cons=0.1,                          # Sec. 4.1
    lambda_adv=0.01, lambda_adv_unl=0.001, cons_start=5000, semi_start_adv=0,   # Sec. 4.1; deviation 8
    latent_norm="all", alpha_denominator="labeled", cons_grad="semantic",       # Eq. (2); deviations 2, 4
    aspp_branches=4, official_optimizer=False, rgb_input=False, no_amp=False,   # deviation 10
    eval_pad=(505, 505), eval_batch_size=4, save_every=1000, eval_every=0, log_every=20)
PRESETS = {
    "voc": {},
    # Sec. 4.1: 505x505 crops, batch 2, 40k iterations, scaling and mirroring; base size 512x1024 (deviation 12)
    "cityscapes": dict(num_steps=40000, batch_size=2, crop_size=(505, 505), resize=(512, 1024), eval_pad=None,
                       eval_batch_size=2),
    # Not the paper's (deviation 13): the same small network, pretrained start and schedule as hung2018.py's synthetic
    # preset, so the two scripts' numbers compare on the same split (README, "The synthetic miniature"): the start is
    # this network pretrained on other generated shapes (the paper's COCO start scaled down), D 3 convs deep (the
    # paper's receptive field / crop ratio).
    "synthetic": dict(backbone="resnet18", width=32, init="synthetic", aspp_rates=(1, 2, 3, 4), num_steps=1000,
                      batch_size=8, crop_size=None, random_scale=False, random_mirror=True, optimizer="adam",
                      lr=5e-4, head_lr_mult=1, ndf=16, d_layers=3, cons_start=250, eval_pad=None, eval_batch_size=50,
                      save_every=400, log_every=100),
}
# Behaviour of Hung's released code that differs from the defaults (methods/README rule 2); see deviation 10.
OFFICIAL_QUIRKS = dict(weight_decay=5e-4, nesterov=False, aspp_branches=2, official_optimizer=True, rgb_input=True,
                       no_amp=True)
SYNTHETIC_SIZE = dict(size=80, num_train=1000, num_val=200)
# Generated data at the paper's image size and class count (common.SyntheticSceneSource), trained with the paper's
# own preset: measures speed and memory at the paper's configuration with nothing to download (README, "Throughput").
PRESETS.update({"synthetic-voc": PRESETS["voc"], "synthetic-cityscapes": PRESETS["cityscapes"]})


class Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line, no usage dump
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def get_parser():
    p = Parser(description="Sawatzky et al.: discovering latent classes for semi-supervised semantic segmentation")
    a = p.add_argument
    a("--data", required=True, help="voc | cityscapes | synthetic | synthetic-voc | synthetic-cityscapes")
    a("--data-root", help="dataset folder (README, 'Datasets'); not needed for synthetic")
    a("--download", action="store_true", help="download VOC 2012 with torchvision first (SBD labels: see README)")
    a("--labeled", type=float, default=0.125, help="fraction of the train set that is labeled, in (0, 1]")
    a("--split", help="file of labeled ids (one per line) to reuse instead of drawing one")
    a("--seed", type=int, default=0, help="seed for the split, the initialisation and the data order")
    a("--out", help="run folder (default runs/latent_classes_<data>_<labeled>_seed<seed>_<time>)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (its own arguments are used)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=int, help="data loader processes per image stream (default: 0 on CPU; on CUDA the CPUs this "
                                  "process may use, less one, shared over the 2 image streams and 1 labels-only stream: "
                                  "common.default_workers); a labels-only stream gets min(N, 1)")
    a("--no-amp", action="store_true", default=None, help="float32 on CUDA (TF32 off too) instead of bf16 autocast")
    a("--compile", action="store_true", help="torch.compile the segmenter and the discriminator(s); partial "
      "batches are dropped (README, 'Throughput')")
    # network and initialisation
    a("--backbone", choices=sorted(BACKBONES), help="paper: resnet101 (smaller ones for quick runs)")
    a("--width", type=int, help="channels of the stem (64 in every torchvision ResNet; synthetic preset: 32)")
    a("--init", choices=["coco", "imagenet", "synthetic", "none"],
      help="coco: COCO-pretrained DeepLab-v2 (paper); imagenet: torchvision weights; synthetic: this network "
           "pretrained on other generated shapes, the miniature's stand-in (built once, cached); none: random")
    a("--restore-from", help=f"path or URL of the DeepLab-v2 (COCO) weights for --init coco (default: {COCO_URL})")
    a("--aspp-rates", type=int, nargs=4, help="ASPP dilation rates of both heads (paper: 6 12 18 24)")
    a("--aspp-branches", type=int, choices=[2, 4], help="4: DeepLab-v2; 2: Hung's released code's bug (quirk)")
    a("--freeze-bn-stats", action="store_true", help="BN in eval mode during training (default: batch statistics)")
    a("--ndf", type=int, help="discriminator width, channels of its first conv (card 5.4: 64)")
    a("--d-layers", type=int, choices=range(2, 7), metavar="{2..6}",
      help="stride-2 convs of D (card 5.4: 5; synthetic preset: 3, the paper's receptive field / crop ratio)")
    # optimisation (Sec. 4.1, Hung et al. Sec. 5)
    a("--num-steps", type=int, help="iterations (VOC 20000, Cityscapes 40000)")
    a("--batch-size", type=int, help="images per batch, each of labeled/unlabeled/D's ground truth (VOC 10)")
    a("--crop-size", type=int, nargs=2, help="training crop H W (VOC 321 321, Cityscapes 505 505)")
    a("--random-scale", action=argparse.BooleanOptionalAction, default=None, help="scale by 0.5..1.6 (Sec. 4.1)")
    a("--random-mirror", action=argparse.BooleanOptionalAction, default=None, help="horizontal flips (Sec. 4.1)")
    a("--optimizer", choices=["sgd", "adam"], help="optimizer of S (Sec. 4.1: SGD; synthetic preset: Adam)")
    a("--lr", type=float, help="S learning rate (Sec. 4.1: 2.5e-4)")
    a("--head-lr-mult", type=float, help="learning-rate factor of both ASPP heads (Hung's code: 10)")
    a("--lr-d", type=float, help="D learning rate, Adam (Sec. 4.1: 1e-4)")
    a("--power", type=float, help="poly decay power (0.9)")
    a("--momentum", type=float, help="SGD momentum (0.9)")
    a("--weight-decay", type=float, help="SGD weight decay (1e-4; Hung's released code 5e-4)")
    a("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum (Hung Table 9)")
    a("--official-optimizer", action=argparse.BooleanOptionalAction, default=None,
      help="quirk: 3-4 SGD sub-steps per backbone weight, with PyTorch 0.4's accumulated weight decay")
    a("--rgb-input", action=argparse.BooleanOptionalAction, default=None,
      help="quirk: feed RGB (not BGR) to the Caffe COCO weights")
    a("--official-quirks", action="store_true", help="turn on every quirk of Hung's released code (deviation 10)")
    a("--amp", dest="no_amp", action="store_false", default=None,
      help="keep bf16 autocast under --official-quirks, which implies --no-amp (deviation 10)")
    # method (Sec. 3-4)
    a("--num-latent", type=int, help="number of latent classes L (Sec. 4.1: 20; Table 4: 2-50)")
    a("--lambda-latent", type=float, help="lambda_latent, weight of L_latent, Eq. (6) (Sec. 4.1: 1.0)")
    a("--lambda-cons", type=float, help="lambda_cons, weight of L_cons, Eq. (11) (Sec. 4.1: 0.1)")
    a("--lambda-adv", type=float, help="lambda_adv for labeled images, Eq. (6) (Sec. 4.1: 0.01)")
    a("--lambda-adv-unl", type=float, help="lambda_adv for unlabeled images, Eq. (11) (Sec. 4.1: 0.001)")
    a("--cons-start", type=int, help="first iteration with L_cons (Sec. 4.1: 5000)")
    a("--semi-start-adv", type=int, help="first iteration with the unlabeled batch and its L_adv (Hung's code: 0)")
    a("--cons-grad", choices=["semantic", "latent", "both"], help="which head L_cons trains (deviation 2)")
    a("--latent-norm", choices=["all", "valid"], help="P_b(c, l) divided by N*H*W (Eq. (2)) or valid pixels (dev. 3)")
    a("--alpha-denominator", choices=["labeled", "all"], help="alpha = N / labeled or all images (deviation 4)")
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
    """Fill every unset option: explicit flag > --official-quirks > dataset preset > paper default."""
    if args.data not in PRESETS:
        raise DataError(f"unknown --data {args.data!r}; choose one of: {', '.join(PRESETS)}")
    if not args.split and not (0 < args.labeled <= 1):
        raise DataError(f"--labeled must be a fraction in (0, 1], got {args.labeled}")
    merged = {**PAPER, **PRESETS[args.data], **(OFFICIAL_QUIRKS if args.official_quirks else {})}
    for k, v in merged.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.num_latent < 1:
        raise DataError(f"--num-latent must be at least 1, got {args.num_latent}")
    for k in ("crop_size", "resize", "eval_pad", "aspp_rates"):
        if getattr(args, k) is not None:
            setattr(args, k, tuple(getattr(args, k)))
    if args.benchmark is not None and (args.benchmark < 1 or args.resume):
        raise DataError("--benchmark N times N >= 1 iterations of a new run (not with --resume)")
    if args.workers is None:
        args.workers = common.default_workers(args.device, image_streams=2, label_streams=1)
    return args

# ================================================================================================================
# Segmentation network S: DeepLab-v2 (card 5.1) with two heads, names as torchvision's ResNet plus `layer5`/`layer6`
# ================================================================================================================
class Bottleneck(nn.Module):
    """ResNet-v1 bottleneck as in Caffe DeepLab: the stride sits in the first 1x1 conv (card 5.1), unless
    `stride_in_3x3` (torchvision's placement, card 5.3). Every 3x3 has dilation d and padding d."""
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
    """DeepLab-v2 ASPP (card 5.2): parallel 3x3 convs with bias at rates 6/12/18/24, outputs summed; no BN/ReLU.

    `branches=2` reproduces the released code's bug (return inside the loop: rate 6 + rate 12 only). All four convs
    always exist so that checkpoints stay interchangeable."""

    def __init__(self, in_channels, num_classes, rates=(6, 12, 18, 24), branches=4):
        super().__init__()
        self.branches = branches
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for conv in self.conv2d_list:           # card 5.2: weights N(0, 0.01); biases keep PyTorch's default
            nn.init.normal_(conv.weight, 0, 0.01)   # U(+-1/sqrt(fan_in)), as the released deeplab.py (paper silent)

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:self.branches]:
            out = out + conv(x)
        return out


BACKBONES = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
             "resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet101": (Bottleneck, (3, 4, 23, 3))}


class DeepLabV2(nn.Module):
    """DeepLab-v2 ResNet (card 5.1) with two ASPP heads (card 5.2): `layer5`, the semantic head with C outputs (the
    name of Hung's model, so its checkpoints map onto it), and `layer6`, the latent head with L outputs (a new name,
    so no checkpoint ever touches it). Ceil-mode max-pool, layer3/layer4 dilated by 2/4 with stride 1 (output
    stride 8), the first block of each dilated stage included. `output_stride=16` is a cheaper variant for small runs."""

    def __init__(self, num_classes, num_latent, backbone="resnet101", aspp_rates=(6, 12, 18, 24), aspp_branches=4,
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
        for m in self.modules():                       # card 5.1: conv N(0, 0.01), BN weight 1 bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        features = width * 8 * block.expansion
        self.layer5 = ASPP(features, num_classes, aspp_rates, aspp_branches)   # semantic head S_c
        self.layer6 = ASPP(features, num_latent, aspp_rates, aspp_branches)    # latent head S_l (deviation 7)
        for m in self.modules():                       # card 5.1: BN affine frozen (statistics: see --freeze-bn-stats)
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

    def forward(self, x, latent=True):                               # (N, 3, H, W)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))         # (N, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))    # (N, 2048, H/8, W/8)
        # semantic logits (N, C, H/8, W/8) and latent logits (N, L, H/8, W/8); test time: semantic only
        return self.layer5(x), (self.layer6(x) if latent else None)


# ================================================================================================================
# Discriminator D (card 5.4): five 4x4 stride-2 convs {64, 128, 256, 512, 1}, LeakyReLU 0.2, no BN; logits ~1/32
# ================================================================================================================
class FCDiscriminator(nn.Module):
    """`layers` stride-2 4x4 convs in all (card 5.4: 5, a receptive field of 94 px, 29% of the 321 px crop). The
    synthetic preset keeps that ratio on its 80 px images with 3 (22 px, 28%; deviation 13): conv1, conv2, classifier."""

    def __init__(self, num_classes, ndf=64, layers=5):
        super().__init__()
        chans = [num_classes] + [ndf * 2 ** k for k in range(layers - 1)]
        for k in range(layers - 1):               # conv1 ... conv4 for the paper's D (checkpoint names kept)
            setattr(self, f"conv{k + 1}", nn.Conv2d(chans[k], chans[k + 1], 4, stride=2, padding=1))
        self.layers = layers
        self.classifier = nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):                          # (N, C, H, W) semantic probabilities or one-hot maps, never S_l
        for k in range(self.layers - 1):           # paper: (N, 64, H/2, W/2) ... (N, 512, H/16, W/16)
            x = self.leaky_relu(getattr(self, f"conv{k + 1}")(x))
        return self.classifier(x)                  # (N, 1, H/32, W/32) raw logits: the sigmoid lives in the loss


def up(x, size):
    """Bilinear upsampling with align_corners=True (card 2), to (H, W) of the crop (deviation 14)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def one_hot(label, num_classes):
    """(N, H, W) -> (N, C, H, W) float; ignore pixels (255) become all-zero vectors (card 2)."""
    return (label[:, None] == torch.arange(num_classes, device=label.device)[None, :, None, None]).float()


# ================================================================================================================
# Losses. The paper sums over pixels; these are means over the counted pixels (deviation 1). Every mean divides by
# max(count, 1), so an all-ignored batch gives 0, not NaN, and nothing here needs a host-device sync.
# ================================================================================================================
def masked_mean(x, mask):
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def bce(z, target, mask=None):
    """Binary cross-entropy on logits z (N, 1, H, W) against a constant target, mean over `mask` (N, H, W)."""
    loss = F.binary_cross_entropy_with_logits(z, torch.full_like(z, float(target)), reduction="none")[:, 0]
    return loss.mean() if mask is None else masked_mean(loss, mask)


# Eq. (12): L_D = -sum (1 - y) log(1 - D(S_c(X))) + y log D(Y); fake and real each averaged, weighted 1/2
def loss_D(z_fake, fake_valid, z_real, real_valid):
    return 0.5 * bce(z_fake, 0, fake_valid) + 0.5 * bce(z_real, 1, real_valid)


# Eq. (4): L_ce = -sum_{h,w} sum_c Y log S_c(X), over pixels with Y != 255
def loss_ce(pred, label):
    loss = F.cross_entropy(pred, label, ignore_index=IGNORE, reduction="none")   # 0 at ignored pixels
    return loss.sum() / (label != IGNORE).sum().clamp(min=1)


# Eq. (5): L_adv = -sum_{h,w} log D(S_c(X)); labeled: over Y != 255, unlabeled (label None): over all pixels
def loss_adv(z, label=None):
    return bce(z, 1, None if label is None else label != IGNORE)


# Eqs. (2) and (8): sum over pixels of Y_onehot S_l^T, a (C, L) co-occurrence matrix; 255 pixels add nothing
def cooccurrence(prob_l, label, num_classes):
    return torch.einsum("nchw,nlhw->cl", one_hot(label, num_classes).to(prob_l.dtype), prob_l)   # (C, L)


# Eqs. (1)-(3): L_latent = H(C | L) = -sum_{l,c} P_b(c, l) log P_b(c | l) on a labeled batch. Computed as
# H(C, L) - H(L) with 1e-8 inside the logs: a class absent from the batch has an all-zero row, where x log x would
# otherwise give NaN gradients (card 3, deviation 5). Eq. (2) divides by N*H*W, void pixels included; `norm="valid"`
# divides by the valid pixels instead (deviation 3). H(C | L) is scale-invariant in P_b inside the log, so the two
# differ by the factor (valid pixels) / (N*H*W) on the loss.
def loss_latent(prob_l, label, num_classes, norm="all"):
    """Returns (L_latent, the co-occurrence sums of Eq. (8), detached: computed once for both)."""
    cooc = cooccurrence(prob_l, label, num_classes)                        # (C, L)
    count = (label != IGNORE).sum().clamp(min=1) if norm == "valid" else label.numel()   # deviation 3
    J = cooc / count                                                       # P_b(c, l), Eq. (2)
    J_l = J.sum(0)                                                         # P_b(l), (L,)
    return -(J * torch.log(J + EPS)).sum() + (J_l * torch.log(J_l + EPS)).sum(), cooc.detach()


# Eq. (8): M <- (1 - alpha) M + alpha sum_pixels Y_onehot S_l^T, on the device, float64, no gradient
def update_M(M, cooc, alpha):
    M.mul_(1 - alpha).add_(cooc.detach().to(M.dtype), alpha=alpha)


# Eq. (9): P(l | c) = M_cl / sum_k M_ck; a class never seen yet gets the uniform row 1/L (deviation 5)
def p_l_given_c(M):
    rows = M.sum(1, keepdim=True)                                          # (C, 1)
    return torch.where(rows > 0, M / rows.clamp(min=torch.finfo(M.dtype).tiny), torch.full_like(M, 1.0 / M.shape[1]))


# Eq. (7): S_hat(l) = sum_c P(l | c) S_c(c): the semantic prediction mapped to latent space; sums to 1 over l
def map_to_latent(prob_c, P):
    return torch.einsum("nchw,cl->nlhw", prob_c, P)                        # (N, L, H, W)


# Eq. (10): L_cons = -1/(NHW) sum_{n,h,w} sum_l S_l log S_hat, over every pixel of the unlabeled batch. P(l | c) is a
# constant. Which side is the soft label: deviation 2 ("semantic": S_l detached, the gradient trains S_c).
def loss_cons(pred_u, lat_u, P, cons_grad="semantic"):
    prob_c = F.softmax(pred_u.detach() if cons_grad == "latent" else pred_u, 1)
    prob_l = F.softmax(lat_u.detach() if cons_grad == "semantic" else lat_u, 1)
    s_hat = map_to_latent(prob_c, P.detach().to(prob_c.dtype))
    return -(prob_l * torch.log(s_hat.clamp(min=EPS))).sum(1).mean()


# Eq. (6): L_labeled = L_ce + lambda_latent L_latent + lambda_adv L_adv
def loss_labeled(loss_ce, loss_latent, loss_adv, lambda_latent, lambda_adv):
    return loss_ce + lambda_latent * loss_latent + lambda_adv * loss_adv


# Eq. (11): L_unlabeled = lambda_adv_u L_adv_u + lambda_cons L_cons. The training loop back-propagates the unlabeled
# and the labeled bracket separately (card 6.2); their gradients add up before one step.
def loss_unlabeled(loss_adv_u, loss_cons, lambda_adv_u, lambda_cons):
    return lambda_adv_u * loss_adv_u + lambda_cons * loss_cons


def effective_latent(M, t):
    """Table 4: the number of latent classes l with P(l | c) > t for some semantic class c seen in training."""
    seen = M.sum(1) > 0
    return int((p_l_given_c(M)[seen] > t).any(0).sum())


# ================================================================================================================
# Optimisation (Sec. 4.1, Hung's): SGD for S with 10x learning rate on both heads, Adam for D, both poly decay
# ================================================================================================================
class OfficialSGD(torch.optim.Optimizer):
    """Quirk of Hung's released code (deviation 10, card 6.1.3): the code lists each backbone weight k times in one
    SGD group (stem conv 1, bottleneck convs 3, downsample convs 4), and the PyTorch <= 0.4 SGD it ran on stepped
    once per listing with the same gradient and one shared momentum buffer. Each listing did, in place,
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
    backbone = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEADS)]
    head = [*model.layer5.parameters(), *model.layer6.parameters()]           # card 6.1: both heads at 10x
    if args.official_optimizer:   # stem conv 1x, bottleneck convs 3x, downsample convs 4x
        k = [1 if n.startswith("conv1.") else 4 if ".downsample." in n else 3 for n, _ in backbone]
        opt_S = OfficialSGD([dict(params=[p for _, p in backbone], k=k), dict(params=head, k=[1] * len(head))],
                            args.momentum, args.weight_decay, args.nesterov)
    elif args.optimizer == "adam":  # synthetic preset (deviation 13): chosen from scratch, where SGD was far slower
        opt_S = torch.optim.Adam([dict(params=[p for _, p in backbone]), dict(params=head)], lr=args.lr,
                                 weight_decay=args.weight_decay)
    else:
        opt_S = torch.optim.SGD([dict(params=[p for _, p in backbone]), dict(params=head)], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.9, 0.99))   # card 6.1: betas (0.9, 0.99)
    return opt_S, opt_D


def poly_lr(opt_S, opt_D, i, args):
    """lr_i = lr * (1 - i/T)^0.9, the heads' group at 10x (card 6.1); the same decay for D."""
    f = (1 - i / args.num_steps) ** args.power
    opt_S.param_groups[0]["lr"], opt_S.param_groups[1]["lr"] = args.lr * f, args.head_lr_mult * args.lr * f
    for g in opt_D.param_groups:
        g["lr"] = args.lr_d * f


def set_train_mode(model, freeze_bn_stats):
    """Hung's code: whole model in train mode, so BN uses batch statistics (deviation 10)."""
    model.train()
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


# ================================================================================================================
# Initialisation from pretrained weights (card 5.3): copy every tensor whose name and shape match, and say so
# ================================================================================================================
HEADS = ("layer5.", "layer6.")   # semantic and latent ASPP heads: never loaded from a checkpoint


def load_pretrained(model, state, source):
    """Copy backbone tensors by name and shape (Hung's code's rule); both heads always stay fresh (card 5.3,
    deviation 7). A tensor whose name matches but whose shape does not, or a file that matches nothing, is an error."""
    if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        state = state.get("state_dict", state.get("model", state))
    clean = {}
    for k, v in state.items():
        if torch.is_tensor(v):
            for prefix in ("module.", "Scale."):      # DataParallel and the Caffe port's wrappers
                k = k[len(prefix):] if k.startswith(prefix) else k
            clean[k] = v
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith(HEADS)]
    wrong = [k for k in backbone if k in clean and clean[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise DataError(f"{source} does not fit this network: {len(wrong)} tensors have other shapes "
                        f"(first: {k} {tuple(clean[k].shape)} vs {tuple(own[k].shape)}); check --backbone/--width")
    matched = [k for k in backbone if k in clean]
    if not matched:
        raise DataError(f"{source} matches no backbone tensor of DeepLabV2({model.backbone_name}); "
                        f"expected names like conv1.weight, layer1.0.conv1.weight (card 5.3)")
    with torch.no_grad():
        for k in matched:
            own[k].copy_(clean[k])
    missing = [k for k in backbone if k not in clean and not k.endswith("num_batches_tracked")]
    unused = sorted(k for k in clean if k not in backbone)
    print(f"loaded {len(matched)}/{len(backbone)} backbone tensors from {source}; "
          f"not in the file: {missing[:6] or 'none'}{' ...' if len(missing) > 6 else ''}; "
          f"in the file but not loaded: {unused[:8] or 'none'}{' ...' if len(unused) > 8 else ''}"
          f"{' (the heads are always initialised fresh)' if any(k.startswith(HEADS) for k in unused) else ''}")
    return matched, missing, unused


class SemanticOnly(DeepLabV2):
    """S returning the semantic logits (N, C, H/8, W/8) only: what `--init synthetic` pretrains with cross-entropy
    (common.synthetic_pretrained). Its layer6 is built but never trained, and neither head is loaded (deviation 7)."""

    def forward(self, x):
        return super().forward(x, latent=False)[0]


def initialise(model, args):
    if args.init == "none":
        return
    if args.init == "imagenet":
        import torchvision
        weights = {"resnet18": torchvision.models.ResNet18_Weights, "resnet34": torchvision.models.ResNet34_Weights,
                   "resnet50": torchvision.models.ResNet50_Weights,
                   "resnet101": torchvision.models.ResNet101_Weights}[args.backbone].IMAGENET1K_V1
        src = weights.url
    elif args.init == "synthetic":    # the miniature's pretrained start (common.synthetic_pretrained, deviation 13)
        rates = ".".join(map(str, args.aspp_rates))      # L is not in the tag: layer6 is never trained nor loaded
        src = common.synthetic_pretrained(
            f"latent_classes-{args.backbone}-w{args.width}-aspp{rates}x{args.aspp_branches}",
            lambda c: SemanticOnly(c, args.num_latent, args.backbone, args.aspp_rates, args.aspp_branches,
                                   width=args.width),
            common.Normalize("imagenet"), args.device)
    else:
        src = args.restore_from or COCO_URL
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
        hint = ("download resnet101COCO-41f33a49.pth by hand (README, 'Weights') and pass --restore-from PATH, or use "
                "--init imagenet" if args.init == "coco" else "check the network connection")
        raise DataError(f"could not load weights from {src}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}; "
                        f"{hint}") from None
    load_pretrained(model, state, src)


# ================================================================================================================
# Data: three endless streams (card 6.1): labeled images, unlabeled images, labeled ground truth for D's "real" input
# ================================================================================================================
def build_data(args, source, labeled, unlabeled, stream_states=None):
    normalize = common.Normalize("caffe", bgr=not args.rgb_input) if args.init == "coco" else common.Normalize("imagenet")
    scales = [0.5 + k / 10 for k in range(12)] if args.random_scale else None      # card 8.2: {0.5, ..., 1.6}
    train_tf = common.TrainTransform(normalize, args.crop_size, scales, args.random_mirror, args.resize)
    label_tf = common.LabelTransform(args.crop_size, scales, args.random_mirror, args.resize)
    eval_tf = common.EvalTransform(normalize, args.eval_pad, args.resize, args.eval_full_res)
    pin = args.device.startswith("cuda")
    states = stream_states or {}
    # one persistent loader per stream; a labels-only stream needs about a tenth of an image stream's CPU
    make = lambda name, ds, k: common.InfiniteLoader(ds, args.batch_size, args.seed * 3 + k,
                                                     min(args.workers, 1) if ds.labels_only else args.workers, pin,
                                                     states.get(name, (0, 0)), device=args.device)
    streams = {"labeled": make("labeled", common.SegDataset(source, labeled, train_tf, args.seed), 0)}
    if use_unlabeled(args, unlabeled):
        streams["unlabeled"] = make("unlabeled", common.SegDataset(source, unlabeled, train_tf, args.seed + 1), 1)
    if use_D(args):
        streams["gt"] = make("gt", common.SegDataset(source, labeled, label_tf, args.seed + 2, labels_only=True), 2)
    val = common.EvalLoader(common.SegDataset(source, source.splits["val"], eval_tf), args.eval_batch_size,
                            args.workers, args.device)
    return streams, val, normalize


def use_D(args):
    return args.lambda_adv > 0 or args.lambda_adv_unl > 0


def use_unlabeled(args, unlabeled):
    return len(unlabeled) > 0 and (args.lambda_adv_unl > 0 or args.lambda_cons > 0)



# ================================================================================================================
# Training (card 6.2)
# ================================================================================================================
LOG_KEYS = ("loss_ce", "loss_latent", "loss_adv", "loss_adv_u", "loss_cons", "loss_D", "D_real", "D_fake")


def train(args, run_dir, model, D, M, alpha, opt_S, opt_D, streams, val_loader, normalize, start, class_names):
    device = torch.device(args.device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
    C = len(class_names)
    has_D, has_unl = "gt" in streams, "unlabeled" in streams
    latent_on = args.lambda_latent > 0 or has_unl and args.lambda_cons > 0   # else the latent head is not run
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
        poly_lr(opt_S, opt_D, i, args)
        opt_S.zero_grad(set_to_none=True)
        opt_D.zero_grad(set_to_none=True)
        D.requires_grad_(False)               # L_labeled and L_unlabeled must not update D (card 3, Eq. (5))

        # (1) segmentation network on an unlabeled batch: lambda_adv_u * L_adv_u + lambda_cons * L_cons, Eq. (11)
        # As in Hung's released code the whole block waits for --semi-start-adv and then runs at every iteration, also
        # before --cons-start with lambda_adv_u = 0: the batch then only passes through S, for BN's batch statistics
        # and D's fakes (deviation 8).
        pred_u = None
        if has_unl and i >= args.semi_start_adv:
            cons_on = args.lambda_cons > 0 and i >= args.cons_start
            adv_u_on = args.lambda_adv_unl > 0
            x_u = to_dev(next(streams["unlabeled"])[0], image=True)   # its labels are never read
            with torch.autocast(**amp), torch.set_grad_enabled(cons_on or adv_u_on):
                pred_u, lat_u = model(x_u, latent=cons_on)
                pred_u = up(pred_u.float(), x_u.shape[-2:])           # (N, C, H, W) semantic logits
                z_u = up(D(F.softmax(pred_u, 1)).float(), x_u.shape[-2:]) if adv_u_on else None   # (N, 1, H, W)
            l_adv_u = loss_adv(z_u) if adv_u_on else 0
            if cons_on:
                lat_u = up(lat_u.float(), x_u.shape[-2:])             # (N, L, H, W) latent logits (deviation 6)
                l_cons = loss_cons(pred_u, lat_u, p_l_given_c(M), args.cons_grad)   # Eqs. (7), (9), (10)
                acc("loss_cons", l_cons)
            else:
                l_cons = 0
            if cons_on or adv_u_on:
                loss_unlabeled(l_adv_u, l_cons, args.lambda_adv_unl, args.lambda_cons).backward()
            if adv_u_on:
                acc("loss_adv_u", l_adv_u)
            images += x_u.shape[0]

        # (2) segmentation network on a labeled batch: L_ce + lambda_latent * L_latent + lambda_adv * L_adv, Eq. (6)
        x, y, _ = next(streams["labeled"])
        x, y = to_dev(x, image=True), to_dev(y)
        with torch.autocast(**amp):
            pred, lat = model(x, latent=latent_on)
            pred = up(pred.float(), y.shape[-2:])
            z = up(D(F.softmax(pred, 1)).float(), y.shape[-2:]) if args.lambda_adv > 0 else None
        l_ce = loss_ce(pred, y)
        l_adv = loss_adv(z, y) if z is not None else 0
        l_latent = 0
        if latent_on:
            prob_l = F.softmax(up(lat.float(), y.shape[-2:]), 1)     # (N, L, H, W) S_l at full res (deviation 6)
            if args.lambda_latent > 0:
                l_latent, cooc = loss_latent(prob_l, y, C, args.latent_norm)
                acc("loss_latent", l_latent)
            else:
                cooc = cooccurrence(prob_l.detach(), y, C)
            update_M(M, cooc, alpha)                                  # Eq. (8), from iteration 0 (card 10.6)
        loss_labeled(l_ce, l_latent, l_adv, args.lambda_latent, args.lambda_adv).backward()
        acc("loss_ce", l_ce)
        if z is not None:
            acc("loss_adv", l_adv)
        images += x.shape[0]

        # (3) discriminator, Eq. (12): semantic predictions (labeled and unlabeled) are fake, ground truth real
        if has_D:
            D.requires_grad_(True)
            fake = pred.detach()
            fake_valid = y != IGNORE                                  # labeled padding/boundaries do not count
            if pred_u is not None:                                    # deviation 9: unlabeled fakes too
                fake = torch.cat([fake, pred_u.detach()])
                fake_valid = torch.cat([fake_valid, torch.ones_like(fake_valid[:1]).expand(pred_u.shape[0], -1, -1)])
            y_gt = to_dev(next(streams["gt"]))                        # separate stream over the labeled subset
            with torch.autocast(**amp):
                z_fake = up(D(F.softmax(fake, 1)).float(), fake.shape[-2:])
                z_real = up(D(one_hot(y_gt, C)).float(), y_gt.shape[-2:])
            l_D = loss_D(z_fake, fake_valid, z_real, y_gt != IGNORE)
            l_D.backward()
            acc("loss_D", l_D)
            acc("D_real", masked_mean(torch.sigmoid(z_real.detach())[:, 0], y_gt != IGNORE))
            acc("D_fake", masked_mean(torch.sigmoid(z_fake.detach())[:, 0], fake_valid))

        opt_S.step()
        if has_D:
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
            save_checkpoint(run_dir, it, model, D, M, opt_S, opt_D, streams)
        if args.eval_every and it % args.eval_every == 0 and it < args.num_steps:
            result, _ = evaluate(model, D, val_loader, C, device, amp, 0)
            write_log({"iter": it, "val_miou": result["miou"]})
            print(f"[{it}] val mIoU {100 * result['miou']:.2f}", flush=True)
            set_train_mode(model, args.freeze_bn_stats)
            D.train()
    return stop


def save_checkpoint(run_dir, it, model, D, M, opt_S, opt_D, streams):
    """last.pt, written atomically: everything needed to continue exactly (the split is labeled.txt beside it)."""
    state = {"iteration": it, "model": model.state_dict(), "D": D.state_dict(), "M": M, "opt_S": opt_S.state_dict(),
             "opt_D": opt_D.state_dict(), "streams": {k: s.state() for k, s in streams.items()}}
    tmp = os.path.join(run_dir, "last.pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(run_dir, "last.pt"))


# ================================================================================================================
# Evaluation (card 8.3): single scale, full val images (VOC padded to 505x505), dataset-level confusion-matrix mIoU
# ================================================================================================================
@torch.no_grad()
def evaluate(model, D, loader, num_classes, device, amp, num_pictures):
    model.eval()
    D.eval()
    cm = common.ConfusionMatrix(num_classes, device)
    pictures = []
    for x, y, _ in loader:
        with torch.autocast(**amp):
            pred = up(model(x, latent=False)[0].float(), y.shape[-2:])   # semantic head only (card 8.3)
        cm.update(pred.argmax(1), y)
        if len(pictures) < num_pictures:                    # paper Fig. 3: D's confidence map sigmoid(D(S(X)))
            with torch.autocast(**amp):
                conf = torch.sigmoid(up(D(F.softmax(pred, 1)).float(), y.shape[-2:]))[:, 0]
            for k in range(min(num_pictures - len(pictures), x.shape[0])):
                pictures.append((x[k].cpu(), y[k].cpu(), pred[k].argmax(0).cpu(), conf[k].cpu()))
    return cm.compute(), pictures


def save_pictures(path, pictures, normalize, pal, class_names):
    """One row per val image: image, ground truth, prediction, D's confidence (dark: fake, bright: real)."""
    rows = []
    for x, y, p, conf in pictures:
        h, w = y.shape
        img = common.denormalize(x, normalize)
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)) if img.shape[:2] != (h, w) else img
        rows.append([img, common.colorize(y.numpy(), pal), common.colorize(p.numpy(), pal),
                     common.heatmap(conf.numpy())])
    scale = max(1, 256 // rows[0][0].shape[0])               # small synthetic images: enlarge for the eye
    rows = [[np.kron(im, np.ones((scale, scale, 1), np.uint8)) for im in r] for r in rows]
    common.save_labeled_grid(path, rows, ["image", "ground truth", "prediction", "sigmoid(D): 0 dark, 1 bright"],
                             class_names, pal)


# curves.png: the losses of Eqs. (6), (11) and (12), D's mean outputs (no T_semi here, so no kept-pixel share)
CURVES = [("segmentation losses, Eqs. (4)-(5) (mean per logged interval)", ["loss_ce", "loss_adv", "loss_adv_u"],
           None),
          ("latent-class losses: L_latent = H(C | L), Eq. (3); L_cons, Eq. (10)", ["loss_latent", "loss_cons"], None),
          ("discriminator loss, Eq. (12)", ["loss_D"], None),
          ("mean sigmoid(D) on ground truth / semantic predictions", ["D_real", "D_fake"], (0, 1)),
          ("val mIoU", ["val_miou"], None)]


def save_p_l_given_c(path, P, class_names, cell=24):
    """Figs. 6-7: P(l | c) as a C x L grid (rows: semantic classes, columns: latent classes), colour bar 0..1."""
    C, L = P.shape
    left, top = 8 + 7 * max(len(n) for n in class_names), 16
    canvas = Image.new("RGB", (left + L * cell + 50, max(top + C * cell + 1, 130)), "white")
    cells = np.kron(common.heatmap(P.numpy()), np.ones((cell, cell, 1), np.uint8))
    cells[::cell], cells[:, ::cell] = 255, 255                   # white grid lines between cells
    canvas.paste(Image.fromarray(cells), (left, top))
    bar = np.kron(common.heatmap(np.linspace(1, 0, 100)[:, None]), np.ones((1, 10, 1), np.uint8))
    canvas.paste(Image.fromarray(bar), (left + L * cell + 12, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((left + L * cell + 25, top - 4), "1", fill="black")
    draw.text((left + L * cell + 25, top + 92), "0", fill="black")
    for c, name in enumerate(class_names):
        draw.text((4, top + c * cell + cell // 2 - 5), name, fill="black")
    for l in range(L):
        draw.text((left + l * cell + cell // 2 - 5, 2), str(l), fill="black")
    canvas.save(path)


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
        saved.setdefault("d_layers", 5)    # run folders from before --d-layers had the paper's D
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
    # network: stride in the 3x3 conv only for torchvision's weights (card 5.3, deviation 14)
    C = len(class_names)
    model = DeepLabV2(C, args.num_latent, args.backbone, args.aspp_rates, args.aspp_branches,
                      stride_in_3x3=args.init == "imagenet", width=args.width)
    D = FCDiscriminator(C, args.ndf, layers=args.d_layers)
    M = torch.zeros(C, args.num_latent, dtype=torch.float64)         # Eq. (8): M^(0) = 0
    # Eq. (8): alpha = batch size / number of images M averages over (deviation 4)
    alpha = args.batch_size / (len(labeled) if args.alpha_denominator == "labeled" else len(source.splits["train"]))
    if alpha > 1:
        raise DataError(f"alpha = batch size / labeled images = {args.batch_size}/{len(labeled)} > 1 would make M "
                        f"negative (Eq. (8)); label more images or use a smaller --batch-size")
    if resume_state is None:
        initialise(model, args)
    else:
        try:
            model.load_state_dict(resume_state["model"])
            D.load_state_dict(resume_state["D"])
            if resume_state["M"].shape != M.shape:
                raise RuntimeError(f"M is {tuple(resume_state['M'].shape)}\nexpected M of {tuple(M.shape)}")
            M.copy_(resume_state["M"])
        except RuntimeError as e:
            raise DataError(f"{args.resume}/last.pt does not fit the network of args.json: "
                            f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    model.to(device, memory_format=torch.channels_last)    # measured 10-25% faster on CPU; the usual layout for
    D.to(device, memory_format=torch.channels_last)        # bf16 convolutions on GPUs (not measured here)
    M = M.to(device)
    opt_S, opt_D = make_optimizers(model, D, args)
    start = 0
    if resume_state is not None:
        opt_S.load_state_dict(resume_state["opt_S"])
        opt_D.load_state_dict(resume_state["opt_D"])
        start = resume_state["iteration"]
    streams, val_loader, normalize = build_data(args, source, labeled, unlabeled,
                                                resume_state and resume_state["streams"])

    if args.resume is None:
        fraction = os.path.basename(args.split) if args.split else args.labeled
        run_dir = args.out or os.path.join("runs", f"latent_classes_{args.data}_{fraction}_seed{args.seed}_"
                                                   f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
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
          f"discriminator {'on' if 'gt' in streams else 'off'}; L = {args.num_latent} latent classes, alpha {alpha:.5f}; "
          f"starting at iteration {start}")

    if args.benchmark:    # README, "Throughput": timed training iterations only
        return common.benchmark(args, run_dir, streams, [model, D], args.num_steps,
                                lambda i: train(args, run_dir, model, D, M, alpha, opt_S,
                                                opt_D, streams, val_loader, normalize, i, class_names))
    if args.compile:
        common.compile_modules([model, D], streams, args.batch_size)
    stop = train(args, run_dir, model, D, M, alpha, opt_S, opt_D, streams, val_loader, normalize, start, class_names)
    common.save_curves(run_dir, CURVES)
    if stop < args.num_steps:
        print(f"stopped at iteration {stop} (--stop-at); continue with --resume {run_dir}")
        return None

    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
    result, pictures = evaluate(model, D, val_loader, len(class_names), device, amp, args.num_pictures)
    if pictures:
        save_pictures(os.path.join(run_dir, "predictions.png"), pictures, normalize, common.palette(args.data),
                      class_names)
    print(common.format_iou_table(result, class_names))
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"iter": stop, "val_miou": result["miou"]}) + "\n")
    common.save_curves(run_dir, CURVES)
    # Table 4 and Figs. 6-7: P(l | c) from the final M (card 10.20); all zeros if the latent head was never run
    P = p_l_given_c(M).cpu()
    effective = {str(t): effective_latent(M, t) for t in (0.1, 0.9)}
    if M.sum() > 0:
        save_p_l_given_c(os.path.join(run_dir, "p_l_given_c.png"), P, class_names)
        print(f"effective latent classes (Table 4): {effective['0.1']} at t = 0.1, {effective['0.9']} at t = 0.9 "
              f"of {args.num_latent}; P(l | c) in p_l_given_c.png")
    metrics = {"miou": result["miou"], "pixel_acc": result["pixel_acc"], "mean_acc": result["mean_acc"],
               "iou": dict(zip(class_names, result["iou"])), "iteration": stop,
               "labeled": len(labeled), "unlabeled": len(unlabeled), "effective_latent": effective,
               "p_l_given_c": [[round(v, 5) for v in row] for row in P.tolist()], "cons_grad": args.cons_grad}
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
