"""Luc, Couprie, Chintala, Verbeek, "Semantic Segmentation using Adversarial Networks", NIPS 2016 Workshop on
Adversarial Training (arXiv 1611.08408). Method card: ../shared/methods/luc2016.md.

Idea. A segmentation network s is trained with cross-entropy plus an adversarial term. A second network a, the
"adversarial", learns to tell ground-truth label maps from label maps produced by s (optionally seeing the image).
s is rewarded when a takes its output for ground truth, which pushes s towards label maps that are consistent over
large regions (higher-order consistency) at no cost at test time: a is thrown away after training. Fully supervised.

Losses (card 3; means, not the paper's sums: deviation 1). enc() is the adversarial's input encoding (card 4):
    Eq. (2)  L_a = bce(a(x, enc(y)), 1) + bce(a(x, enc(s(x))), 0)        a is updated, s(x) detached
    Eq. (3)  L_s = mce(s(x), y) + lambda * bce(a(x, enc(s(x))), 1)      s is updated, a frozen; the "flipped label"
             form of -lambda * bce(a(x, enc(s(x))), 0) (Sec. 3.1, after Goodfellow et al.)
    encodings (Sec. 3.2): basic  enc(p) = p * m (C channels, no image)
                          product enc(p)_{3c+k} = p_c * m * x_k (3C channels, image at the label map's resolution)
                          scaling the real input is ybar: ybar_l = max(tau, s_l), ybar_c = s_c (1 - ybar_l) / (1 - s_l),
                                  tau = 0.9; the fake input is s(x) * m. m = valid-pixel mask (void -> zero input and
                                  zero gradient, Sec. 3.2 last paragraph).
VOC: Dilated-8 (VGG-16 + context module), adversarial LargeFOV / SmallFOV / -light (supp. Table 1), slow alternation
(500 iterations of a, then 500 of s), per-configuration slr / alr / lambda of supp. Table 2. Stanford Background:
Farabet et al.'s multi-scale net from scratch, two-branch adversarial (label map + image), lambda 2, alr 1e-3.

Reproduce Table 2 (LargeFOV, Product: 72.0 mIoU, 47.7 mBF) from a converged Dilated-8 (README, "luc2016"):
    python luc2016.py --data voc --data-root DATA/VOC --restore-from DILATED8.pt
Table 1 (Stanford Background, 54.3 mIoU adversarial vs 51.3): python luc2016.py --data stanford --data-root DATA/SB
(baseline: add --lambda-adv 0). No code was released, so there are no released-code quirks and no --official-quirks.

Deviations and choices (card section 13 is the source of every [I] choice):
 1. Means instead of sums: mce over valid pixels, bce over the adversarial's output locations; L_a = real + fake.
 2. a(x, y) is a scalar in the equations; the nets are fully convolutional, so every output location is one binary
    decision (card 13.1). `--adv-average` averages the logits over space first (one decision per image).
 3. VOC nets end in 2 channels: a = softmax(z)[real] = sigmoid(z_real - z_fake), so one bce code path (card 13.2).
 4. Supp. Table 1 is scrambled in the text: the layer lists are the card's reconstruction (FOV 34 / 18, four of the
    eight parameter counts reproduced exactly; the other four are copy errors in the supplement).
 5. Supp. Fig. 1 (Stanford adversarial) is lost: the card's reconstruction (label branch 5x5 -> 64, image branch
    5x5 -> 16 -> 64, trunk 128-pool-256-pool-512-1). `--encoding` applies to its label branch as well.
    `--adv-pools` (default 2, Sec. 3.2's two max-pools) shortens its trunk for the synthetic preset (deviation 14).
 6. Schedule: `--alternation slow` phases of `--phase-length` 500 iterations, adversarial first (card 13.6);
    `--alternation fast` (Stanford, synthetic): one a-step then one s-step on the same batch every iteration.
    --num-steps counts s-updates in both schemes, so a baseline with the same --num-steps gets as many.
 7. Optimisers (not stated): SGD; s momentum 0.9; a momentum 0 on VOC (alr up to 0.5), 0.9 on Stanford; constant
    learning rates; weight decay 5e-4 for s (none for a) on VOC (the VGG/Dilation solvers' value), 1e-5 for both
    networks on Stanford (card 13.14).
 8. Losses at the output resolution against labels sampled at each output cell's centre; evaluation at full
    resolution after bilinear x8 (x4) upsampling of the logits (card: of the probabilities) and a crop (card
    13.8-13.9). The image for Product / the image branch: antialiased bilinear resize (Stanford: of the LCN image).
 9. Dilated-8 uses "same" padding instead of valid convolutions + a 186-px reflected margin (card 12.2); the context
    module is the "Large" one with generalised identity initialisation (noise sigma 1e-3); the new classifier is
    N(0, 0.001); the adversarials and Farabet's net keep PyTorch's default initialisation (none is stated). VOC
    training images are whole, mirrored at random, padded bottom/right to 504x504 with the mean colour (card 7.1
    suggests reflection).
10. The COCO-pretrained Caffe Dilation8 weights are not obtainable here: `--init dilated8` loads a converged Dilated-8
    given by --restore-from (e.g. this script's own pre-training run from torchvision's VGG-16, README). Expect a
    baseline of 67-70 val mIoU instead of 71.8 (card 12.3): compare gains, over seeds, not absolute numbers. That
    pre-training trains front end and context module jointly at one constant lr (Yu & Koltun: one after the other).
11. Farabet net (card 6.2): dense 7x7 convs (no random connection tables, no Y/UV split), tanh, RGB with local
    contrast normalisation per scale (9x9 Gaussian, sigma 2), the three scales share weights, fused by a 1x1 conv.
    Trained on full images (the paper: "patch-wise") with flips, +-8 deg rotations (corners: black image, void
    label) and scales drawn from {0.9, 0.95, 1, 1.05, 1.1}.
12. Stanford: 1 of 8 seeded folds of the train split is held out (`--val-folds 8`) to select the final model by
    per-class accuracy (Sec. 4); the 142-image "val" split is the paper's test set. VOC: selection on val, as the paper.
13. BF (card 10; common.boundary_f1) on all evaluated images with the evaluation labels (void pixels belong to no
    class) unless `--bf-ids` / `--bf-label-dir` give the paper's 1,103 fully annotated SBD images. Per-class
    accuracy averages over the classes present in the evaluated ground truth (common.ConfusionMatrix).
14. The `synthetic` preset is not the paper's setting (see PRESETS): Farabet's net at half width, pretrained on other
    generated shapes (`--init synthetic`, common.synthetic_pretrained: the miniature's stand-in for the pretrained
    start that ImageNet / the converged Dilated-8 gives on VOC; the paper trains Farabet's net from scratch on
    Stanford); the Stanford adversarial without max-pools (`--adv-pools 0`: it sees 36 px of the 80 px image, as the
    paper's sees 120 px of 320x240, StanfordAdversary); Adam; lambda 0.1.
"""
import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from common import IGNORE, DataError

# ================================================================================================================
# Arguments. Defaults are the paper's VOC setting; `PRESETS` holds what differs per dataset.
# ================================================================================================================
# Supp. Table 2: (slr, alr, lambda) per adversarial architecture and encoding, selected on VOC12 val. The baseline
# (cross-entropy only) used slr 1e-6. Used for every value not given on the command line when --data voc.
TABLE2 = {("largefov", "basic"): (1e-4, 0.5, 1.0), ("largefov", "product"): (1e-6, 0.1, 1.0),
          ("largefov", "scaling"): (1e-5, 0.1, 1.0), ("smallfov", "basic"): (1e-5, 0.2, 1.0),
          ("smallfov", "product"): (1e-4, 0.1, 0.1), ("smallfov", "scaling"): (1e-4, 0.5, 1.0),
          ("largefov-light", "basic"): (1e-4, 0.5, 0.1), ("largefov-light", "product"): (1e-6, 0.1, 1.0),
          ("largefov-light", "scaling"): (1e-4, 0.1, 0.1), ("smallfov-light", "basic"): (1e-5, 0.1, 1.0),
          ("smallfov-light", "product"): (1e-5, 0.2, 1.0), ("smallfov-light", "scaling"): (1e-4, 0.5, 1.0)}
BASELINE_SLR = 1e-6
PAPER = dict(
    segmenter="dilated8", init="dilated8", width=16,                        # Sec. 3.2: fine-tune Dilated-8
    adversary="largefov", encoding="product", tau=0.9, adv_pools=2,         # Table 2, supp. Table 3; Sec. 3.2
    alternation="slow", phase_length=500, num_steps=10000,                  # Sec. 4: slow scheme; card 13.6: 20 cycles
    batch_size=10, crop_size=(504, 504), scales=None, max_rotation=0.0, random_mirror=True,   # card 7.1 [I]
    optimizer="sgd", momentum=0.9, momentum_d=0.0, weight_decay=5e-4, weight_decay_d=0.0,   # deviation 7
    val_folds=0, select="miou", eval_every=500, eval_pad=None, eval_batch_size=1,          # card 7.1, 13.6
    save_every=500, log_every=20)
PRESETS = {
    "voc": {},
    # Sec. 4 and card 7.2: Farabet's net from scratch, lambda 2, alr 1e-3, every-iteration alternation, 200 epochs
    # of the 501 training images (7 of 8 folds) at batch 8, model selected on the held-out fold by per-class accuracy.
    "stanford": dict(segmenter="farabet", init="none", adversary="stanford", encoding="basic", lambda_adv=2.0,
                     lr=1e-3, lr_d=1e-3, alternation="fast", num_steps=12600, batch_size=8, crop_size=(240, 320),
                     scales=(0.9, 0.95, 1.0, 1.05, 1.1), max_rotation=8.0, momentum_d=0.9, weight_decay=1e-5,
                     weight_decay_d=1e-5, val_folds=8, select="mean_acc", eval_every=315, save_every=630),
    # Not the paper's (deviation 14): the Stanford setting made small enough for a 2-core CPU in about 3 minutes:
    # Farabet's net at half width, pretrained on other generated shapes (the miniature's one protocol for all five
    # scripts: the pretrained start plays the part of ImageNet / the converged Dilated-8), the adversarial with the
    # paper's receptive field / image ratio (adv_pools 0, see StanfordAdversary), Adam for both networks, all 1,000
    # images, no held-out fold. lambda was chosen on the synthetic val set (seed 0, 1,500 steps, mIoU; measured from
    # scratch with the two-pool adversarial, in an earlier version that read each cell's label at its corner, not its
    # centre): 0 -> 38.9, 0.1 -> 34.0, 0.3 -> 30.9, 2 (the paper's Stanford value) -> 20.5, the mIoU falling steadily
    # with lambda: the adversarial term did not help with all labels there (README, "luc2016"); 0.1 hurt least.
    "synthetic": dict(segmenter="farabet", init="synthetic", width=8, adversary="stanford", adv_pools=0,
                      encoding="basic", lambda_adv=0.1, lr=1e-3, lr_d=1e-4, alternation="fast", num_steps=1000,
                      batch_size=8, crop_size=None, optimizer="adam", weight_decay=0.0, eval_every=0,
                      eval_batch_size=50, save_every=500, log_every=100),
}
SYNTHETIC_SIZE = dict(size=80, num_train=1000, num_val=200)
# Generated data at the paper's image size and class count (common.SyntheticSceneSource), trained with the paper's
# own preset: measures speed and memory at the paper's configuration with nothing to download (README, "Throughput").
PRESETS.update({"synthetic-voc": PRESETS["voc"]})


class Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line, no usage dump
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def get_parser():
    p = Parser(description="Luc et al. 2016: semantic segmentation using adversarial networks")
    a = p.add_argument
    a("--data", required=True, help="voc | stanford | synthetic | synthetic-voc")
    a("--data-root", help="dataset folder (README, 'Datasets'); not needed for synthetic")
    a("--download", action="store_true", help="download the dataset first (VOC: torchvision; Stanford: iccv09Data)")
    a("--labeled", type=float, default=1.0, help="fraction of the train set used (the paper: all, 1.0)")
    a("--split", help="file of labeled ids (one per line) to reuse instead of drawing one")
    a("--seed", type=int, default=0, help="seed for the split, the held-out fold, the initialisation, the data order")
    a("--out", help="run folder (default runs/luc2016_<data>_<labeled>_seed<seed>_<time>)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (its own arguments are used)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=int, help="data loader processes (default: 0 on CPU; on CUDA the CPUs this process may use, "
                                  "less one, shared over the 1 image stream: common.default_workers)")
    a("--no-amp", action="store_true", help="float32 on CUDA (TF32 off too) instead of bf16 autocast")
    a("--compile", action="store_true", help="torch.compile the segmenter and the discriminator(s); partial "
      "batches are dropped (README, 'Throughput')")
    # networks (Sec. 3.2, supp. Table 1)
    a("--segmenter", choices=["dilated8", "farabet"], help="dilated8 (VOC) or farabet (Stanford Background)")
    a("--init", choices=["dilated8", "vgg16", "synthetic", "none"],
      help="dilated8: a converged Dilated-8 from --restore-from (VOC); vgg16: torchvision ImageNet VGG-16 front end "
           "(to pre-train one); synthetic: this segmenter pretrained on other generated shapes, the miniature's "
           "stand-in (built once, cached); none: from scratch (Stanford)")
    a("--restore-from", help="Dilated-8 weights for --init dilated8: a run's last.pt / best.pt or a state dict")
    a("--width", type=int, help="farabet: channels of the first stage, then 4x and 16x (Farabet: 16)")
    a("--adversary", choices=["largefov", "smallfov", "largefov-light", "smallfov-light", "stanford"],
      help="adversarial network (supp. Table 1; stanford: supp. Fig. 1)")
    a("--encoding", choices=["basic", "product", "scaling"], help="adversarial input encoding (Sec. 3.2)")
    a("--tau", type=float, help="Scaling: least mass on the true class (Sec. 3.2: 0.9)")
    a("--adv-pools", type=int, choices=range(3), metavar="{0,1,2}",
      help="max-pools of the stanford adversarial's trunk (Sec. 3.2: 2; synthetic preset: 0, the paper's receptive "
           "field / image ratio)")
    a("--adv-average", action="store_true", help="one decision per image: average a's logits over space (dev. 2)")
    # optimisation
    a("--alternation", choices=["slow", "fast"], help="slow: phases of --phase-length (VOC); fast: every iteration")
    a("--phase-length", type=int, help="iterations per phase of the slow scheme (Sec. 4: 500)")
    a("--num-steps", type=int, help="updates of the segmentation network (VOC 10000 = 20 cycles; Stanford 12600)")
    a("--batch-size", type=int, help="images per batch (VOC 10, Stanford 8)")
    a("--crop-size", type=int, nargs=2, help="training images are padded / cropped to H W (VOC 504 504)")
    a("--random-mirror", action=argparse.BooleanOptionalAction, default=None, help="horizontal flips")
    a("--optimizer", choices=["sgd", "adam"], help="optimizer of both networks (paper: SGD; synthetic: Adam)")
    a("--lr", type=float, help="segmenter learning rate, slr (VOC: supp. Table 2; Stanford 1e-3)")
    a("--lr-d", type=float, help="adversarial learning rate, alr (VOC: supp. Table 2; Stanford Sec. 4: 1e-3)")
    a("--momentum", type=float, help="segmenter SGD momentum (0.9)")
    a("--momentum-d", type=float, help="adversarial SGD momentum (VOC 0, Stanford 0.9)")
    a("--weight-decay", type=float, help="segmenter weight decay (VOC 5e-4, Stanford 1e-5)")
    a("--weight-decay-d", type=float, help="adversarial weight decay (VOC 0, Stanford 1e-5)")
    a("--lambda-adv", type=float, help="lambda of Eq. (1) (VOC: supp. Table 2; Stanford Sec. 4: 2); 0 = baseline")
    # run
    a("--val-folds", type=int, help="hold out 1 of N seeded folds of train to select the model (Stanford: 8)")
    a("--select", choices=["miou", "mean_acc", "pixel_acc"], help="metric that selects best.pt")
    a("--eval-every", type=int, help="evaluate every N segmenter updates for model selection (0: only at the end)")
    a("--eval-batch-size", type=int)
    a("--bf-ids", help="file of val ids on which BF is computed (the paper: 1,103 fully annotated VOC images)")
    a("--bf-label-dir", help="folder of <id>.png index labels used as BF ground truth (the paper: SBD masks)")
    a("--log-every", type=int, help="print and log every N iterations (the only host-device sync in the loop)")
    a("--save-every", type=int, help="write last.pt every N iterations")
    a("--stop-at", type=int, help="stop after this many iterations with a checkpoint (continue with --resume)")
    a("--benchmark", type=int, metavar="N", help="time N training iterations after a warm-up, write benchmark.json; "
      "no evaluation, pictures or checkpoints (README, 'Throughput')")
    a("--peak-tflops", type=float, help="the device's dense bf16 peak for --benchmark (default: a table of known GPUs)")
    a("--num-pictures", type=int, default=4, help="val images drawn into predictions.png")
    return p


def resolve_args(args):
    """Fill every unset option: explicit flag > dataset preset > supp. Table 2 (VOC) > paper default."""
    if args.data not in PRESETS:
        raise DataError(f"unknown --data {args.data!r}; choose one of: {', '.join(PRESETS)}")
    if not args.split and not (0 < args.labeled <= 1):
        raise DataError(f"--labeled must be a fraction in (0, 1], got {args.labeled}")
    adv_pools_given = getattr(args, "adv_pools", None) is not None
    for k, v in {**PAPER, **PRESETS[args.data]}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if adv_pools_given and args.adversary != "stanford" and not args.resume:
        raise DataError(f"--adv-pools shapes the stanford adversarial only, not {args.adversary} (supp. Table 1)")
    if args.data in ("voc", "synthetic-voc"):               # supp. Table 2 for every value not given
        if args.lambda_adv == 0 and args.lr is None:
            args.lr = BASELINE_SLR
        if None in (args.lr, args.lr_d, args.lambda_adv):
            if (args.adversary, args.encoding) not in TABLE2:
                raise DataError(f"supp. Table 2 has no {args.adversary} adversary on VOC; choose one of LargeFOV, "
                                f"SmallFOV and their -light variants, or give --lr, --lr-d and --lambda-adv")
            slr, alr, lam = TABLE2[(args.adversary, args.encoding)]
            args.lambda_adv = lam if args.lambda_adv is None else args.lambda_adv
            args.lr = slr if args.lr is None else args.lr
            args.lr_d = alr if args.lr_d is None else args.lr_d
    for k in ("crop_size", "scales", "eval_pad"):
        if getattr(args, k) is not None:
            setattr(args, k, tuple(getattr(args, k)))
    if args.segmenter == "farabet" and args.init not in ("none", "synthetic"):
        raise DataError("--segmenter farabet is trained from scratch (Sec. 4): use --init none (or --init synthetic, "
                        "the miniature's pretrained start)")
    if args.segmenter == "dilated8" and args.init == "dilated8" and not args.restore_from and not args.resume:
        raise DataError("--init dilated8 fine-tunes a converged Dilated-8: pass --restore-from PATH (README, "
                        "'luc2016': pre-train one with --init vgg16 --lambda-adv 0 --lr 1e-3 --batch-size 14 "
                        "--num-steps 60000)")
    if args.eval_batch_size > 1 and args.eval_pad is None and args.data != "synthetic":
        raise DataError(f"--eval-batch-size {args.eval_batch_size}: {args.data} images differ in size; use 1")
    if args.phase_length < 1 or args.num_steps < 1 or not (0 < args.tau < 1):
        raise DataError("--phase-length and --num-steps must be >= 1 and --tau in (0, 1)")
    if args.benchmark is not None and (args.benchmark < 1 or args.resume):
        raise DataError("--benchmark N times N >= 1 iterations of a new run (not with --resume)")
    if args.workers is None:
        args.workers = common.default_workers(args.device, image_streams=1, label_streams=0)
    return args


# ================================================================================================================
# Segmentation network s, VOC: Dilated-8 (Yu & Koltun 2016; card 6.1) with torchvision VGG-16 parameter layout
# ================================================================================================================
VGG_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TV_FEATURES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)   # conv indices in torchvision's vgg16.features


class ContextModule(nn.Module):
    """The "Large" context module (card 6.1): 3x3 convs with dilations 1, 1, 2, 4, 8, 16, 1 and widths 2C, 2C, 4C,
    8C, 16C, 32C, 32C, then a 1x1 conv to C; ReLU after all but the last. Generalised identity initialisation: the
    centre tap from input map a to output map b is C / c_out when floor(a C / c_in) == floor(b C / c_out), all other
    weights N(0, sigma^2), biases 0, so that a fresh module passes non-negative class scores through unchanged."""
    DILATIONS = (1, 1, 2, 4, 8, 16, 1, 1)
    WIDTHS = (2, 2, 4, 8, 16, 32, 32, 1)

    def __init__(self, C, sigma=1e-3):
        super().__init__()
        self.convs = nn.ModuleList()
        c_in = C
        for d, m in zip(self.DILATIONS, self.WIDTHS):
            k = 1 if m == 1 else 3
            conv = nn.Conv2d(c_in, m * C, k, padding=d * (k // 2), dilation=d)
            with torch.no_grad():
                conv.weight.normal_(0, sigma)
                conv.bias.zero_()
                same = (torch.arange(m * C) * C // (m * C))[:, None] == (torch.arange(c_in) * C // c_in)[None, :]
                conv.weight[:, :, k // 2, k // 2][same] = C / (m * C)
            self.convs.append(conv)
            c_in = m * C

    def forward(self, x):                                # (N, C, h, w) -> (N, C, h, w)
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        return self.convs[-1](x)


class Dilated8(nn.Module):
    """VGG-16 without pool4 and pool5, conv5 dilated by 2, fc6 as a 7x7 conv dilated by 4, fc7 as 1x1 (dropout 0.5
    after both), a new C-way 1x1 classifier and the context module (card 6.1). Output stride 8: (N, C, H/8, W/8)."""
    HEAD = ("final.", "context.")                  # class-specific: their shapes follow C

    def __init__(self, num_classes):
        super().__init__()
        c_in = 3
        for s, widths in enumerate(VGG_STAGES, 1):
            for j, c in enumerate(widths, 1):
                d = 2 if s == 5 else 1
                setattr(self, f"conv{s}_{j}", nn.Conv2d(c_in, c, 3, padding=d, dilation=d))
                c_in = c
        self.fc6 = nn.Conv2d(512, 4096, 7, padding=12, dilation=4)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.final = nn.Conv2d(4096, num_classes, 1)
        nn.init.normal_(self.final.weight, 0, 0.001)
        nn.init.zeros_(self.final.bias)
        self.context = ContextModule(num_classes)

    def forward(self, x):                                                    # (N, 3, H, W)
        for s, widths in enumerate(VGG_STAGES, 1):
            for j in range(1, len(widths) + 1):
                x = F.relu(getattr(self, f"conv{s}_{j}")(x))
            if s <= 3:                                                       # pool4 and pool5 removed
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)                    # Caffe rounds up
        x = F.dropout(F.relu(self.fc6(x)), 0.5, self.training)              # (N, 4096, H/8, W/8)
        x = F.dropout(F.relu(self.fc7(x)), 0.5, self.training)
        return self.context(self.final(x))                                   # (N, C, H/8, W/8)


def load_vgg16(model, state):
    """torchvision VGG-16 ImageNet weights -> Dilated-8 front end (card 12.1): the 13 convs by position, fc6's
    4096 x 25088 matrix reshaped to 4096 x 512 x 7 x 7, fc7 to 1 x 1. The classifier and context stay fresh."""
    names = [f"conv{s}_{j}" for s, w in enumerate(VGG_STAGES, 1) for j in range(1, len(w) + 1)]
    pairs = [(f"{n}.{t}", f"features.{k}.{t}") for n, k in zip(names, TV_FEATURES) for t in ("weight", "bias")]
    pairs += [("fc6.weight", "classifier.0.weight"), ("fc6.bias", "classifier.0.bias"),
              ("fc7.weight", "classifier.3.weight"), ("fc7.bias", "classifier.3.bias")]
    own = model.state_dict()
    with torch.no_grad():
        for ours, theirs in pairs:
            if theirs not in state or state[theirs].numel() != own[ours].numel():
                raise DataError(f"the VGG-16 weights have no {theirs} of {own[ours].numel()} values; "
                                f"expected torchvision's vgg16 layout")
            own[ours].copy_(state[theirs].reshape(own[ours].shape))
    print(f"loaded {len(pairs)} VGG-16 tensors (conv1_1..conv5_3, fc6, fc7); final and context initialised fresh")


def load_dilated8(model, path):
    """A converged Dilated-8 in this script's parameter names: a run folder's last.pt / best.pt ("model") or a
    plain state dict. Every tensor must be there with its shape: fine-tuning a half-loaded network is not Table 2."""
    if not os.path.isfile(path):
        raise DataError(f"--restore-from {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DataError(f"{path} is not a Dilated-8 of this script ({str(e).splitlines()[0][:160]}); pre-train one "
                        f"with --init vgg16 (README, 'luc2016')") from None
    print(f"loaded the Dilated-8 weights of {path}")


def load_synthetic(model, path):
    """The miniature's pretrained start (--init synthetic): every tensor by name and shape except the class-specific
    output layer (`model.HEAD`; the pretraining had 9 classes), which stays fresh. Anything else missing or of
    another shape is an error: the file belongs to another network."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as e:
        raise DataError(f"could not read {path} ({e.__class__.__name__}); delete it to rebuild it") from None
    own = model.state_dict()
    head = [k for k in own if k.startswith(model.HEAD)]
    body = [k for k in own if k not in head]
    bad = [k for k in body if k not in state or state[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise DataError(f"{path} does not fit this segmenter: {len(bad)} tensors missing or of another shape (first: "
                        f"{k} {tuple(state[k].shape) if k in state else 'missing'} vs {tuple(own[k].shape)}); "
                        f"delete it to rebuild it")
    with torch.no_grad():
        for k in body:
            own[k].copy_(state[k])
    shapes = lambda keys, d: ", ".join([f"{k} {tuple(d[k].shape)}" for k in keys[:8]] + ["..."] * (len(keys) > 8))
    print(f"loaded {len(body)}/{len(own)} tensors by name and shape from {path}: {shapes(body, own)}; left fresh "
          f"(class-specific output layer): {shapes(head, own)}; in the file but not loaded: "
          f"{shapes(sorted(set(state) - set(body)), state) or 'none'}")
    return body, head


# ================================================================================================================
# Segmentation network s, Stanford Background: Farabet et al.'s multi-scale convnet (card 6.2), from scratch
# ================================================================================================================
@torch.autocast("cuda", enabled=False)
def lcn(x, size=9, sigma=2.0, eps=1e-2):
    """Local contrast normalisation over all channels (card 13.15): v = x - G*x, y = v / max(mean(s), s) with
    s = sqrt(G*v^2), G a normalised 9x9 Gaussian (sigma 2) summed over channels; borders replicated."""
    x = x.float()                                                 # float32 even inside bf16 autocast
    r = torch.arange(size, dtype=torch.float32, device=x.device) - size // 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = (g[:, None] * g[None, :])
    k = (k / (k.sum() * x.shape[1])).to(x.dtype).expand(1, x.shape[1], size, size)
    pad = lambda t: F.pad(t, (size // 2,) * 4, mode="replicate")
    v = x - F.conv2d(pad(x), k)                                   # (N, 3, H, W) minus the local mean (N, 1, H, W)
    s = F.conv2d(pad(v * v), k).clamp(min=0).sqrt()               # (N, 1, H, W) local standard deviation
    return v / torch.maximum(s, s.mean((2, 3), keepdim=True)).clamp(min=eps)


class MultiScaleNet(nn.Module):
    """Farabet et al. 2013 (card 6.2): the image at scales 1, 1/2, 1/4, each contrast-normalised, goes through one
    shared trunk (7x7 conv -> tanh -> 2x2 max-pool, twice, then a 7x7 filter bank); the coarse scales' features are
    upsampled to the finest grid, concatenated (3 x 16w channels) and classified by a 1x1 conv. Output stride 4."""
    HEAD = ("classifier.",)                        # the class-specific output layer

    def __init__(self, num_classes, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, padding=3)
        self.conv2 = nn.Conv2d(width, 4 * width, 7, padding=3)
        self.conv3 = nn.Conv2d(4 * width, 16 * width, 7, padding=3)
        self.classifier = nn.Conv2d(3 * 16 * width, num_classes, 1)

    def trunk(self, x):                                                      # (N, 3, H, W)
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2, ceil_mode=True)      # (N, w, H/2, W/2)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, ceil_mode=True)      # (N, 4w, H/4, W/4)
        return self.conv3(x)                                                 # (N, 16w, H/4, W/4)

    def forward(self, x):
        H, W = x.shape[-2:]
        feats = []
        for f in (1, 2, 4):
            xs = x if f == 1 else F.interpolate(x, size=(math.ceil(H / f), math.ceil(W / f)), mode="bilinear",
                                                antialias=True, align_corners=False)
            feats.append(self.trunk(lcn(xs)))
        size = feats[0].shape[-2:]
        feats = [feats[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in feats[1:]]
        return self.classifier(torch.cat(feats, 1))                         # (N, C, H/4, W/4)


def make_segmenter(args, num_classes):
    if args.segmenter == "farabet":
        return MultiScaleNet(num_classes, args.width)
    return Dilated8(num_classes)


# ================================================================================================================
# Adversarial network a (supp. Table 1, card 5): returns one "real" logit per output location, (N, 1, h', w')
# ================================================================================================================
# (kernel, out channels) per conv, "P" = 2x2 max-pool; ReLU after every conv but the last (card 5.1)
ADVERSARIES = {
    "largefov-light": [(3, 96), (3, 128), (3, 128), "P", (3, 128), (3, 128), "P", (3, 256), (3, 2)],
    "largefov": [(3, 96), (3, 128), (3, 128), "P", (3, 256), (3, 256), "P", (3, 512), (3, 2)],
    "smallfov-light": [(3, 96), (1, 128), "P", (3, 128), (1, 128), "P", (3, 256), (1, 2)],
    "smallfov": [(3, 96), (1, 128), "P", (3, 256), (1, 256), "P", (3, 512), (1, 2)],
}


class Adversary(nn.Module):
    """VOC adversarials (supp. Table 1): the label map (C or 3C channels) only; the image enters through Product.
    The 2-channel output is turned into one logit, z_real - z_fake, i.e. the 2-way softmax's real prob. (dev. 3)."""

    def __init__(self, in_channels, layers):
        super().__init__()
        mods, c = [], in_channels
        for l in layers:
            if l == "P":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(c, l[1], l[0], padding=l[0] // 2), nn.ReLU(inplace=True)]
                c = l[1]
        self.net = nn.Sequential(*mods[:-1])                  # no ReLU after the last conv

    def forward(self, p, image=None):                       # (N, C', h, w)
        z = self.net(p)                                      # (N, 2, h/4, w/4): channel 0 synthetic, 1 ground truth
        return z[:, 1:2] - z[:, 0:1]                         # (N, 1, h/4, w/4)


# Receptive field, in label-map cells, x4 for input pixels (Farabet's output stride 4). Paper's trunk (pools=2):
# label branch 5x5 -> 5, 3x3 -> 7, pool -> 8, 3x3 -> 12, pool -> 14, 3x3 -> 22, 3x3 -> 30 cells = 120 px; the image
# branch (two 5x5, 9 cells) reaches 34 cells = 136 px. Stanford Background trains on whole images of about 320x240:
# 120 px is 38% of the width and 50% of the height (43% of 277 px, the side of a square of the same area); 136 px
# is 42-57%. The synthetic 80x80 images give a 20x20 label map: the paper's trunk would see 120 px = 150% (136 px =
# 170%) of the image from every decision and make only 5x5 of them. The project keeps the paper's ratio of the
# adversarial's receptive field to the training image (as hung2018's D: 22 of 80 px for Hung's 94 of 321), so the
# synthetic preset drops both pools with the conv after each (pools=0: 3x3 128 -> 128, 3x3 -> 1): label branch
# 5 -> 7 -> 9 cells = 36 px = 45% of 80, image branch 13 cells = 52 px = 65%, and 20x20 = 400 decisions per image
# (the paper: 15x20 = 300). pools=1 would see 64 px = 80% (image branch 80 px = 100%) with 10x10 decisions.
class StanfordAdversary(nn.Module):
    """Two-branch adversarial of supp. Fig. 1 as the card reconstructs it (card 5.2): the label map and the image
    (contrast-normalised, at the label map's resolution) get separate branches of 64 channels each, then a trunk
    of 3x3 convs with two max-pools (16x fewer decisions than label pixels) ending in one sigmoid logit. `pools`
    < 2 keeps only the first `pools` (max-pool, 3x3 conv) stages of the trunk (synthetic preset: 0, see above)."""

    def __init__(self, in_channels, pools=2):
        super().__init__()
        self.label_branch = nn.Sequential(nn.Conv2d(in_channels, 64, 5, padding=2), nn.ReLU(inplace=True))
        self.image_branch = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(inplace=True),
                                          nn.Conv2d(16, 64, 5, padding=2), nn.ReLU(inplace=True))
        trunk, c = [nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(inplace=True)], 128
        for _ in range(pools):                            # paper: pool, 128 -> 256; pool, 256 -> 512
            trunk += [nn.MaxPool2d(2, 2), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(inplace=True)]
            c *= 2
        self.trunk = nn.Sequential(*trunk, nn.Conv2d(c, 1, 3, padding=1))   # paper's names: trunk.0, .3, .6, .8

    def forward(self, p, image):                                        # (N, C', h, w), (N, 3, h, w)
        z = torch.cat([self.label_branch(p), self.image_branch(image)], 1)   # (N, 128, h, w)
        return self.trunk(z)                                            # (N, 1, h/4, w/4) (pools=0: h, w)


def make_adversary(args, num_classes):
    c_in = 3 * num_classes if args.encoding == "product" else num_classes   # Sec. 3.2: Product has 3C channels
    if args.adversary == "stanford":
        return StanfordAdversary(c_in, args.adv_pools)
    return Adversary(c_in, ADVERSARIES[args.adversary])


def adversary_logits(A, p, image, average=False):
    """a's logits; with --adv-average one decision per image (deviation 2)."""
    z = A(p, image)
    return z.mean((2, 3), keepdim=True) if average else z


# ================================================================================================================
# Input encodings (Sec. 3.2, card 4). Everything at the segmenter's output resolution (h, w).
# ================================================================================================================
def one_hot(label, num_classes):
    """(N, h, w) -> (N, C, h, w) float; void pixels (255) become all-zero vectors."""
    return (label[:, None] == torch.arange(num_classes, device=label.device)[None, :, None, None]).float()


STRIDE = {"dilated8": 8, "farabet": 4}                     # output stride of each segmenter


def downsample_labels(y, size, stride):
    """Nearest-neighbour subsampling of the (N, H, W) label map to the output grid (card 13.9): output cell j covers
    input pixels stride*j .. stride*(j+1) - 1, so its label is the one at stride*j + stride/2. Cells whose centre
    lies outside the image (ceil-mode border) are void."""
    H, W = y.shape[-2:]
    iy = torch.arange(size[0], device=y.device) * stride + stride // 2
    ix = torch.arange(size[1], device=y.device) * stride + stride // 2
    out = y[:, iy.clamp(max=H - 1)][:, :, ix.clamp(max=W - 1)].clone()     # (N, h, w)
    out[:, iy >= H] = IGNORE
    out[:, :, ix >= W] = IGNORE
    return out


def upsample_logits(logits, size, stride):
    """Evaluation (card 6.1, "zoom"): bilinear x stride, then crop to the image, so that cell j stays centred on the
    pixels it covers (a plain resize to (H, W) would stretch the grid by up to stride/2 pixels at the far border)."""
    up = F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False)
    return up[..., :size[0], :size[1]]


def adversary_image(x, size, segmenter):
    """The image at the label map's resolution (card 13.10), normalised as the segmenter sees it: Product multiplies
    it into the label map (VOC), the Stanford adversarial's image branch reads it (LCN'd, as for Farabet's net)."""
    if segmenter == "farabet":
        x = lcn(x)                                      # card 13.10: the LCN image, then resized
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


# Sec. 3.2, "Scaling": for a pixel of true class l, ybar_l = max(tau, s_l) and ybar_c = s_c (1 - ybar_l) / (1 - s_l)
# for c != l; built from the detached s(x) of the same image. Where s_l >= tau, ybar = s exactly (card 13.12).
def scaling_target(s, y, tau):
    s = s.detach()
    onehot = one_hot(y, s.shape[1])                                       # (N, C, h, w), zero at void pixels
    s_l = (s * onehot).sum(1, keepdim=True)                               # (N, 1, h, w)
    ybar_l = torch.clamp(s_l, min=tau)
    rest = s * (1 - ybar_l) / (1 - s_l).clamp(min=1 - tau)                # denominator >= 1 - tau where it is used
    ybar = torch.where(onehot > 0, ybar_l.expand_as(s), rest)
    return torch.where(s_l >= tau, s, ybar) * (y != IGNORE)[:, None]       # void pixels: zero vectors


# Sec. 3.2: Basic feeds p * m; Product feeds p_c * m * x_k for every class c and colour k (class-major, 3C channels).
# m multiplies the (possibly non-detached) probabilities, so void pixels get zero input AND zero gradient (card 13.11).
def encode(p, valid, image, encoding):
    p = p * valid[:, None].to(p.dtype)                                    # (N, C, h, w)
    if encoding == "product":
        return (p[:, :, None] * image[:, None]).flatten(1, 2)              # (N, 3C, h, w)
    return p


# ================================================================================================================
# Losses (card 3). Means, not the paper's sums (deviation 1); every mean divides by max(count, 1).
# ================================================================================================================
def bce(z, target):
    """l_bce(a, target) with a = sigmoid(z), averaged over the batch and every output location."""
    return F.binary_cross_entropy_with_logits(z, torch.full_like(z, float(target)))


# Eq. (1), first term: l_mce(s(x), y) = -sum_i sum_c y_ic ln s_ic over labelled pixels (255 ignored)
def loss_mce(logits, y):
    loss = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="none")
    return loss.sum() / (y != IGNORE).sum().clamp(min=1)


# Eq. (2): L_a = l_bce(a(x, y), 1) + l_bce(a(x, s(x)), 0); the caller passes logits of detached fakes
def loss_a(z_real, z_fake):
    return bce(z_real, 1) + bce(z_fake, 0)


# Eq. (3) with the flipped label (Sec. 3.1): -lambda l_bce(a(x, s(x)), 0) is replaced by +lambda l_bce(a(x, s(x)), 1)
def loss_adv(z_fake):
    return bce(z_fake, 1)


def loss_s(l_mce, l_adv, lambda_adv):
    return l_mce + lambda_adv * l_adv


# ================================================================================================================
# Schedule (Sec. 4): slow = phases of L iterations, adversarial first (card 13.6); fast = both every iteration
# ================================================================================================================
def phase(g, args):
    """What iteration g updates: "A" (adversarial), "S" (segmenter) or "AS" (first a, then s, one shared batch)."""
    if args.lambda_adv == 0:
        return "S"                                   # baseline: cross-entropy only, no adversarial at all
    if args.alternation == "fast":
        return "AS"
    return "A" if (g // args.phase_length) % 2 == 0 else "S"


def total_iterations(args):
    """Loop length that gives exactly --num-steps segmenter updates (the slow scheme adds the A-phases)."""
    n, L = args.num_steps, args.phase_length
    if args.lambda_adv == 0 or args.alternation == "fast":
        return n
    return 2 * L * (n // L) + (L + n % L if n % L else 0)


def s_updates_before(g, args):
    if args.lambda_adv == 0 or args.alternation == "fast":
        return g
    L = args.phase_length
    return L * (g // (2 * L)) + max(0, g % (2 * L) - L)


def make_optimizers(model, A, args):
    if args.optimizer == "adam":                     # synthetic preset only (deviation 14)
        opt_S = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        opt_A = torch.optim.Adam(A.parameters(), lr=args.lr_d, weight_decay=args.weight_decay_d)
    else:                                            # deviation 7: SGD, constant learning rates
        opt_S = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        opt_A = torch.optim.SGD(A.parameters(), lr=args.lr_d, momentum=args.momentum_d,
                                weight_decay=args.weight_decay_d)
    return opt_S, opt_A


def initialise(model, args):
    if args.init == "vgg16":
        import torchvision
        url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=True)
        except Exception as e:
            raise DataError(f"could not load VGG-16 weights from {url}: {e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:200]}; check the network connection") from None
        load_vgg16(model, state)
    elif args.init == "dilated8":
        load_dilated8(model, args.restore_from)
    elif args.init == "synthetic":    # the miniature's pretrained start (common.synthetic_pretrained, deviation 14)
        path = common.synthetic_pretrained(f"luc2016-{args.segmenter}-w{args.width}",
                                           lambda c: make_segmenter(args, c),
                                           common.Normalize("imagenet"), args.device)   # as build_data normalises
        load_synthetic(model, path)


# ================================================================================================================
# Data: one endless stream of labeled images (the adversarial's "real" maps are the same images' labels, Eq. (2))
# ================================================================================================================
def split_train(source, args):
    """(train ids, held-out ids): with --val-folds N, fold 0 of a seeded partition of train is held out (Sec. 4)."""
    ids = list(source.splits["train"])
    if not args.val_folds:
        return ids, []
    if args.val_folds < 2:
        raise DataError(f"--val-folds must be 0 or >= 2, got {args.val_folds}")
    perm = np.random.default_rng(args.seed + 1000).permutation(len(ids))
    held = {ids[k] for k in perm[::args.val_folds]}
    return [i for i in ids if i not in held], [i for i in ids if i in held]


def build_data(args, source, labeled, stream_state=None):
    normalize = common.Normalize("imagenet")          # torchvision VGG-16 (card 12.1); LCN follows for farabet
    train_tf = common.TrainTransform(normalize, args.crop_size, args.scales, args.random_mirror, None,
                                     args.max_rotation, resample="pil")   # no released code: PIL, as before
    eval_tf = common.EvalTransform(normalize, args.eval_pad)
    pin = args.device.startswith("cuda")
    stream = common.InfiniteLoader(common.SegDataset(source, labeled, train_tf, args.seed), args.batch_size,
                                   args.seed * 3, args.workers, pin, stream_state or (0, 0), device=args.device)
    loader = lambda ids: common.EvalLoader(common.SegDataset(source, ids, eval_tf), args.eval_batch_size, args.workers,
                                           args.device)
    return stream, loader, normalize


# ================================================================================================================
# Training
# ================================================================================================================
LOG_KEYS = ("loss_mce", "loss_adv", "loss_a", "a_real", "a_fake", "acc_real", "acc_fake")


def train(args, run_dir, model, A, opt_S, opt_A, stream, select_loader, start, class_names, best):
    device = torch.device(args.device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
    C = len(class_names)
    G = total_iterations(args)
    stop = min(G, args.stop_at or G)
    sums = torch.zeros(len(LOG_KEYS), device=device)     # running sums on the device, read every --log-every
    counts = [0] * len(LOG_KEYS)

    def acc(key, value):
        k = LOG_KEYS.index(key)
        sums[k] += value.detach().float()
        counts[k] += 1

    t_last, g_last, images = time.time(), start, 0
    log_path = os.path.join(run_dir, "log.jsonl")

    def write_log(rec):
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    for g in range(start, stop):
        ph = phase(g, args)
        x, y, _ = next(stream)                      # on the device, normalised, labels int64 (common.InfiniteLoader)
        x = x.contiguous(memory_format=torch.channels_last)

        # the segmenter's prediction: with gradients when s is updated, else in eval mode (no dropout, card 13.18)
        model.train("S" in ph)
        with torch.autocast(**amp), torch.set_grad_enabled("S" in ph):
            logits = model(x).float()                                        # (N, C, h, w)
        s = F.softmax(logits, 1)
        y_s = downsample_labels(y, logits.shape[-2:], STRIDE[args.segmenter])   # (N, h, w)
        valid = y_s != IGNORE
        image = (adversary_image(x.float(), logits.shape[-2:], args.segmenter) if args.lambda_adv > 0 and
                 (args.encoding == "product" or args.adversary == "stanford") else None)   # baseline: unused

        # (1) adversarial network, Eq. (2): ground truth (or ybar, Scaling) is real, the detached prediction fake
        if "A" in ph:
            A.requires_grad_(True)
            real = scaling_target(s, y_s, args.tau) if args.encoding == "scaling" else one_hot(y_s, C)
            with torch.autocast(**amp):
                z_real = adversary_logits(A, encode(real, valid, image, args.encoding), image, args.adv_average)
                z_fake = adversary_logits(A, encode(s.detach(), valid, image, args.encoding), image, args.adv_average)
            l_a = loss_a(z_real.float(), z_fake.float())
            opt_A.zero_grad(set_to_none=True)
            l_a.backward()
            opt_A.step()
            acc("loss_a", l_a), acc("acc_real", (z_real > 0).float().mean()), acc("acc_fake", (z_fake < 0).float().mean())
            acc("a_real", torch.sigmoid(z_real.detach().float()).mean())     # a's mean output on ground truth
            acc("a_fake", torch.sigmoid(z_fake.detach().float()).mean())     # ... and on the predictions

        # (2) segmentation network, Eq. (3) flipped: L_s = mce + lambda * bce(a(x, enc(s(x))), 1); a is frozen
        if "S" in ph:
            l_mce = loss_mce(logits, y_s)
            l_adv = 0
            if args.lambda_adv > 0:
                A.requires_grad_(False)
                with torch.autocast(**amp):
                    z = adversary_logits(A, encode(s, valid, image, args.encoding), image, args.adv_average)
                l_adv = loss_adv(z.float())
                acc("loss_adv", l_adv)
            opt_S.zero_grad(set_to_none=True)
            loss_s(l_mce, l_adv, args.lambda_adv).backward()
            opt_S.step()
            acc("loss_mce", l_mce)
        images += x.shape[0]

        it = g + 1
        n_s = s_updates_before(it, args)
        if it % args.log_every == 0 or it == stop:
            values = (sums / torch.tensor([max(c, 1) for c in counts], device=device)).tolist()   # the one sync
            dt = time.time() - t_last
            rec = {"iter": it, "s_updates": n_s, **{k: round(v, 5) for k, v, c in zip(LOG_KEYS, values, counts) if c},
                   "img_per_s": round(images / dt, 1)}
            eta = (stop - it) * dt / max(it - g_last, 1)
            if device.type == "cuda":
                rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            print(f"[{it}/{G}] s-updates {n_s} " + " ".join(f"{k} {rec[k]:.4f}" for k in LOG_KEYS if k in rec) +
                  f" | {rec['img_per_s']} img/s | ETA {datetime.timedelta(seconds=int(eta))}", flush=True)
            write_log(rec)
            sums.zero_()
            counts = [0] * len(LOG_KEYS)
            t_last, g_last, images = time.time(), it, 0
        # model selection (Sec. 4): after every --eval-every segmenter updates, on the held-out fold (or val)
        if "S" in ph and args.eval_every and (n_s % args.eval_every == 0 or n_s == args.num_steps):
            result, _ = evaluate(model, A, select_loader, C, device, amp, args)
            write_log({"iter": it, "s_updates": n_s, **{f"select_{k}": result[k] for k in ("miou", "mean_acc",
                                                                                          "pixel_acc")}})
            print(f"[{it}] selection set: mIoU {100 * result['miou']:.2f} per-class acc "
                  f"{100 * result['mean_acc']:.2f} pixel acc {100 * result['pixel_acc']:.2f}", flush=True)
            if result[args.select] > best.get("value", -1):
                best.update(value=result[args.select], s_updates=n_s, iteration=it)
                save_atomic({"model": model.state_dict(), **best}, os.path.join(run_dir, "best.pt"))
        if not args.benchmark and (it % args.save_every == 0 or it == stop):   # --benchmark: no checkpoint
            save_atomic({"iteration": it, "model": model.state_dict(), "A": A.state_dict(),
                         "opt_S": opt_S.state_dict(), "opt_A": opt_A.state_dict(), "stream": stream.state(),
                         "best": best, "rng": torch.get_rng_state(),      # dropout masks continue exactly
                         "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0)},
                        os.path.join(run_dir, "last.pt"))
    return stop, G


def save_atomic(state, path):
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


# ================================================================================================================
# Evaluation (Sec. 4, card 10): full images, logits upsampled bilinearly; per-class acc., pixel acc., mIoU, BF
# ================================================================================================================
@torch.no_grad()
def evaluate(model, A, loader, num_classes, device, amp, args, num_pictures=0, bf=None):
    """bf: None, or (tolerance per id, id -> BF ground truth or None for the evaluation label)."""
    model.eval()
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False   # val sizes vary (batch 1)
    cm = common.ConfusionMatrix(num_classes, device)
    pictures, scores = [], []
    for x, y, ids in loader:
        with torch.autocast(**amp):
            logits = model(x).float()
        pred = upsample_logits(logits, y.shape[-2:], STRIDE[args.segmenter]).argmax(1)
        cm.update(pred, y)
        if bf is not None:
            theta, bf_label = bf
            for k, i in enumerate(ids):
                if i in theta:
                    gt = bf_label(i)
                    scores.append(common.boundary_f1(pred[k], y[k] if gt is None else gt, num_classes, theta[i]))
        if len(pictures) < num_pictures:            # a's opinion of the prediction: dark = "synthetic"
            conf = [None] * x.shape[0]
            if args.lambda_adv > 0:                 # the baseline's adversarial is untrained: no picture of it
                s = F.softmax(logits, 1)
                valid = torch.ones_like(s[:, 0], dtype=torch.bool)
                image = adversary_image(x.float(), s.shape[-2:], args.segmenter)
                with torch.autocast(**amp):
                    z = adversary_logits(A, encode(s, valid, image, args.encoding), image, args.adv_average).float()
                conf = F.interpolate(torch.sigmoid(z), size=y.shape[-2:], mode="nearest")[:, 0].cpu()
            for k in range(min(num_pictures - len(pictures), x.shape[0])):
                pictures.append((x[k].cpu(), y[k].cpu(), pred[k].cpu(), conf[k]))
    torch.backends.cudnn.benchmark = benchmark
    result = cm.compute()
    if scores:
        result["bf_mean"], result["bf_std"], result["bf_images"] = float(np.nanmean(scores)), float(np.nanstd(scores)), len(scores)
    return result, pictures


def bf_setup(args, source, val_ids):
    """Per-image tolerances (5 px for the smallest diagonal of the BF set, card 10) and the BF ground truth."""
    ids = val_ids
    if args.bf_ids:
        if not os.path.isfile(args.bf_ids):
            raise DataError(f"--bf-ids {args.bf_ids!r} does not exist")
        with open(args.bf_ids) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        unknown = sorted(set(ids) - set(val_ids))
        if unknown:
            raise DataError(f"--bf-ids names {len(unknown)} ids that are not in the val set (first: {unknown[0]!r})")
    if args.bf_label_dir:
        path = lambda i: os.path.join(args.bf_label_dir, i + ".png")
        missing = [i for i in ids if not os.path.isfile(path(i))]
        if missing:
            raise DataError(f"--bf-label-dir has no {path(missing[0])} ({len(missing)} of {len(ids)} missing)")
        sizes = []
        for i in ids:
            with Image.open(path(i)) as im:
                sizes.append((im.size[1], im.size[0]))
        bf_label = lambda i: torch.from_numpy(common.read_label(path(i), len(source.CLASSES)).astype(np.int64))
    else:
        sizes = [source.read_label(i).shape for i in ids]
        bf_label = lambda i: None
    return dict(zip(ids, common.bf_tolerances(sizes))), bf_label


def save_pictures(path, pictures, normalize, pal, class_names):
    """One row per val image: image, ground truth, prediction, the adversarial's probability that it is real
    (bright: "ground truth", dark: "synthetic"; not drawn for the baseline)."""
    rows = [[common.denormalize(x, normalize), common.colorize(y.numpy(), pal), common.colorize(p.numpy(), pal)] +
            ([] if conf is None else [common.heatmap(conf.numpy())]) for x, y, p, conf in pictures]
    h, w = rows[0][0].shape[:2]
    rows = [[np.asarray(Image.fromarray(im).resize((w, h), Image.NEAREST)) for im in r] for r in rows]
    scale = max(1, 256 // h)                                  # small synthetic images: enlarge for the eye
    rows = [[np.kron(im, np.ones((scale, scale, 1), np.uint8)) for im in r] for r in rows]
    titles = ["image", "ground truth", "prediction", "sigmoid(a): 0 synthetic, 1 ground truth"]
    common.save_labeled_grid(path, rows, titles[:len(rows[0])], class_names, pal)


# curves.png: the losses, the adversarial's mean outputs and accuracies, model selection and the final val scores
CURVES = [("segmenter losses (mean per logged interval): l_mce, l_bce(a(x, s(x)), 1)", ["loss_mce", "loss_adv"],
           None),
          ("adversarial loss L_a, Eq. (2)", ["loss_a"], None),
          ("mean sigmoid(a) on ground truth / predictions; a's accuracy on each", ["a_real", "a_fake", "acc_real",
                                                                                   "acc_fake"], (0, 1)),
          ("model selection (held-out fold or val): mIoU, per-class accuracy", ["select_miou", "select_mean_acc"],
           (0, 1)),
          ("val mIoU and mean BF (last model; the selected one at its iteration)",
           ["val_miou", "val_bf", "val_miou_selected", "val_bf_selected"], (0, 1))]


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
        args = argparse.Namespace(**saved)
        args.__dict__.update(keep)
        args.workers = args.workers if args.workers is not None else saved["workers"]
        args.split, args.resume = os.path.join(run_dir, "labeled.txt"), run_dir
        if "adv_pools" not in saved:                # runs from before --adv-pools had the paper's trunk
            args.adv_pools = 2
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
    train_ids, held_out = split_train(source, args)
    labeled, unlabeled = common.labeled_split(train_ids, args.labeled, args.seed, args.split)
    val_ids = source.splits["val"]
    bf = bf_setup(args, source, val_ids)
    model = make_segmenter(args, len(class_names))
    A = make_adversary(args, len(class_names))
    if resume_state is None:
        initialise(model, args)
    else:
        try:
            model.load_state_dict(resume_state["model"])
            A.load_state_dict(resume_state["A"])
        except RuntimeError as e:
            raise DataError(f"{args.resume}/last.pt does not fit the networks of args.json: "
                            f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    model.to(device, memory_format=torch.channels_last)
    A.to(device, memory_format=torch.channels_last)
    opt_S, opt_A = make_optimizers(model, A, args)
    start, best = 0, {}
    if resume_state is not None:
        opt_S.load_state_dict(resume_state["opt_S"])
        opt_A.load_state_dict(resume_state["opt_A"])
        start, best = resume_state["iteration"], resume_state["best"]
        torch.set_rng_state(resume_state["rng"])
        if device.type == "cuda" and resume_state["cuda_rng"].numel():
            torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
    stream, loader, normalize = build_data(args, source, labeled, resume_state and resume_state["stream"])
    select_loader = loader(held_out or val_ids)

    if args.resume is None:
        run_dir = args.out or os.path.join("runs", f"luc2016_{args.data}_{os.path.basename(args.split) if args.split else args.labeled}"
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
        common.write_list(os.path.join(run_dir, "val.txt"), val_ids)
        if held_out:
            common.write_list(os.path.join(run_dir, "held_out.txt"), held_out)
    print(f"run folder: {run_dir}")
    print("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(f"{len(labeled)} training images{f' ({len(unlabeled)} train images unused)' if unlabeled else ''}; "
          f"{len(held_out)} held out for model selection; {len(val_ids)} val images; adversarial "
          f"{'off (baseline)' if args.lambda_adv == 0 else f'{args.adversary}, {args.encoding} encoding, {args.alternation} alternation'}; "
          f"starting at iteration {start}")

    streams = {"train": stream}           # one stream, in a dict for common.benchmark / compile_modules
    if args.benchmark:    # README, "Throughput": timed training iterations only
        return common.benchmark(args, run_dir, streams, [model, A], total_iterations(args),
                                lambda i: train(args, run_dir, model, A, opt_S, opt_A,
                                                streams["train"], select_loader, i, class_names, best)[0])
    if args.compile:
        common.compile_modules([model, A], streams, args.batch_size)
        stream = streams["train"]
    stop, G = train(args, run_dir, model, A, opt_S, opt_A, stream, select_loader, start, class_names, best)
    common.save_curves(run_dir, CURVES)
    if stop < G:
        print(f"stopped at iteration {stop} (--stop-at); continue with --resume {run_dir}")
        return None

    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.no_amp)
    val_loader = loader(val_ids)
    result, pictures = evaluate(model, A, val_loader, len(class_names), device, amp, args, args.num_pictures, bf)
    metrics = {"last": summary(result, class_names), "iteration": stop, "s_updates": args.num_steps,
               "train_images": len(labeled), "held_out": len(held_out)}
    final_log = [{"iter": stop, "s_updates": args.num_steps, "val_miou": result["miou"],
                  **({"val_bf": result["bf_mean"]} if "bf_mean" in result else {})}]
    if best:                                        # Sec. 4: the model selected on the held-out fold is reported
        model.load_state_dict(torch.load(os.path.join(run_dir, "best.pt"), map_location="cpu",
                                         weights_only=True)["model"])
        result, pictures = evaluate(model, A, val_loader, len(class_names), device, amp, args, args.num_pictures, bf)
        metrics["best"] = {**summary(result, class_names), "s_updates": best["s_updates"],
                           f"selection_{args.select}": best["value"]}
        final_log.append({"iter": best["iteration"], "s_updates": best["s_updates"], "val_miou_selected":
                          result["miou"], **({"val_bf_selected": result["bf_mean"]} if "bf_mean" in result else {})})
    metrics.update({k: v for k, v in metrics["best" if best else "last"].items() if k != "s_updates"},
                   reported="best" if best else "last")
    if pictures:
        save_pictures(os.path.join(run_dir, "predictions.png"), pictures, normalize, common.palette(args.data),
                      class_names)
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write("".join(json.dumps(rec) + "\n" for rec in final_log))
    common.save_curves(run_dir, CURVES)
    print(common.format_iou_table(result, class_names))
    print(f"{'per-class acc':<16} {100 * result['mean_acc']:5.1f}\n{'mean BF':<16} "
          f"{100 * result.get('bf_mean', float('nan')):5.1f}  (std {100 * result.get('bf_std', float('nan')):.1f}, "
          f"{result.get('bf_images', 0)} images){'  [model selected at s-update %d]' % best['s_updates'] if best else ''}")
    with open(os.path.join(run_dir, "metrics.json.tmp"), "w") as f:   # written last: its presence means "complete"
        json.dump(metrics, f, indent=1)
    os.replace(os.path.join(run_dir, "metrics.json.tmp"), os.path.join(run_dir, "metrics.json"))
    return metrics


def summary(result, class_names):
    return {"miou": result["miou"], "mean_acc": result["mean_acc"], "pixel_acc": result["pixel_acc"],
            "bf_mean": result.get("bf_mean"), "bf_std": result.get("bf_std"), "bf_images": result.get("bf_images"),
            "iou": dict(zip(class_names, result["iou"]))}


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
