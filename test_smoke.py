"""Tests for common.py, hung2018.py, latent_classes.py, luc2016.py, s4gan_mlmt.py and dual_disc.py: CPU only, no network.  Run: python -m pytest -q"""
import copy
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import hung2018
from hung2018 import DeepLabV2, FCDiscriminator, loss_D, loss_adv, loss_ce, loss_semi, loss_seg

TINY = ["--num-steps", "4", "--semi-start", "2", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
        "--num-pictures", "2"]


@pytest.fixture(autouse=True, scope="session")
def _tiny_pretraining(tmp_path_factory):
    """`--init synthetic` (the synthetic presets' default) builds its weights on first use: in the tests a tiny recipe
    into a private torch hub folder, so that the tests neither wait minutes nor touch the user's cache."""
    old_dir, old_recipe = torch.hub.get_dir(), dict(common.PRETRAIN_RECIPE)
    torch.hub.set_dir(str(tmp_path_factory.mktemp("hub")))
    common.PRETRAIN_RECIPE.update(num_images=16, steps=3, batch_size=4)
    yield
    torch.hub.set_dir(old_dir)
    common.PRETRAIN_RECIPE.clear()
    common.PRETRAIN_RECIPE.update(old_recipe)


def run_main(argv):
    """Run hung2018.main in-process; returns its metrics (None when stopped early)."""
    return hung2018.main(argv)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------
def test_end_to_end_synthetic(tmp_path):
    out = str(tmp_path / "run")
    metrics = run_main(["--data", "synthetic", "--out", out] + TINY)
    assert 0.0 <= metrics["miou"] <= 1.0
    for name in ("args.json", "labeled.txt", "log.jsonl", "last.pt", "metrics.json", "predictions.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    log, final = read_log(out)[:-1], read_log(out)[-1]
    assert [r["iter"] for r in log] == [1, 2, 3, 4]
    assert final == {"iter": 4, "val_miou": metrics["miou"]}            # the final val mIoU, for curves.png
    for r in log:
        for k in ("loss_ce", "loss_adv", "loss_adv_u", "loss_D"):
            assert math.isfinite(r[k]), (k, r)
    assert "loss_semi" in log[-1] and "loss_semi" not in log[0]        # L_semi only from --semi-start
    with open(os.path.join(out, "labeled.txt")) as f:
        assert len(f.read().split()) == 125                             # 1/8 of 1,000 synthetic train images
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert set(m["iou"]) == set(common.SyntheticSource.CLASSES)


def test_baseline_mode_has_no_discriminator(tmp_path):
    out = str(tmp_path / "base")
    run_main(["--data", "synthetic", "--out", out, "--lambda-adv", "0", "--lambda-adv-unl", "0",
              "--lambda-semi", "0"] + TINY)
    log = read_log(out)
    assert "loss_D" not in log[0] and "loss_adv_u" not in log[0] and "loss_ce" in log[0]


def test_same_seed_same_split_and_losses(tmp_path):
    runs = []
    for k in range(2):
        out = str(tmp_path / f"s{k}")
        run_main(["--data", "synthetic", "--out", out, "--stop-at", "2"] + TINY)
        with open(os.path.join(out, "labeled.txt")) as f:
            runs.append((f.read(), read_log(out)))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1][0]["loss_ce"] == runs[1][1][0]["loss_ce"]
    assert runs[0][1][1]["loss_D"] == runs[1][1][1]["loss_D"]
    other = common.labeled_split([f"i{k}" for k in range(100)], 0.25, seed=1)[0]
    assert other != common.labeled_split([f"i{k}" for k in range(100)], 0.25, seed=0)[0]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_gives_the_same_losses(tmp_path, workers):
    """Also with 2 persistent loader workers per stream (issue 14): the stopped and the resumed part draw exactly the
    batches of the straight run (made without workers), although the workers had prepared batches ahead."""
    straight, parted = str(tmp_path / "a"), str(tmp_path / "b")
    tiny = TINY + ["--labeled", "0.006"]            # 6 labeled images in batches of 4: a new pass every 2 iterations
    run_main(["--data", "synthetic", "--out", straight] + tiny)
    assert run_main(["--data", "synthetic", "--out", parted, "--stop-at", "2", "--workers", workers] + tiny) is None
    assert not os.path.exists(os.path.join(parted, "metrics.json"))
    run_main(["--data", "synthetic", "--resume", parted, "--workers", workers])
    a, b = read_log(straight), read_log(parted)
    assert [r["iter"] for r in b] == [1, 2, 3, 4, 4]                   # + the final val mIoU
    for ra, rb in zip(a, b):
        for k in ("loss_ce", "loss_adv", "loss_adv_u", "loss_D", "loss_semi"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra["iter"])


# ---------------------------------------------------------------------------------------------------------------
# Losses against direct formulas
# ---------------------------------------------------------------------------------------------------------------
def _logits(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)


def test_loss_ce_direct():
    pred = _logits(2, 3, 4, 5)
    label = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(1))
    label[0, 0, :] = 255
    logp = torch.log_softmax(pred, 1)
    terms = [-logp[n, label[n, h, w], h, w] for n in range(2) for h in range(4) for w in range(5) if label[n, h, w] != 255]
    assert loss_ce(pred, label).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-10)
    changed = label.clone()
    changed[0, 0, 0] = 1                                          # a class instead of 255 changes L_ce
    assert loss_ce(pred, changed).item() != pytest.approx(loss_ce(pred, label).item(), rel=1e-10)


def test_all_ignored_gives_zero_not_nan():
    pred = _logits(1, 3, 4, 4).requires_grad_(True)
    label = torch.full((1, 4, 4), 255)
    z = _logits(1, 1, 4, 4)
    for loss in (loss_ce(pred, label), loss_adv(z, label), loss_D(z, label != 255, z, label != 255),
                 loss_semi(pred, torch.full_like(z, -20.0), 0.2)[0]):
        assert torch.isfinite(loss) and loss.item() == 0.0
    loss_ce(pred, label).backward()
    assert torch.isfinite(pred.grad).all()


def test_loss_adv_and_D_direct():
    z_fake, z_real = _logits(2, 1, 3, 3), _logits(3, 1, 3, 3)
    lab = torch.zeros(2, 3, 3, dtype=torch.long)
    lab[1, 2, :] = 255
    valid = lab != 255
    sig = torch.sigmoid
    adv = torch.stack([-torch.log(sig(z_fake[n, 0, h, w])) for n in range(2) for h in range(3) for w in range(3)
                       if valid[n, h, w]]).mean()
    assert loss_adv(z_fake, lab).item() == pytest.approx(adv.item(), rel=1e-9)
    assert loss_adv(z_fake).item() == pytest.approx((-torch.log(sig(z_fake))).mean().item(), rel=1e-9)
    moved = z_fake.clone()
    moved[1, 0, 2, :] += 5                                       # D's logits at ignored pixels do not count
    assert loss_adv(moved, lab).item() == pytest.approx(adv.item(), rel=1e-9)
    real_valid = torch.ones(3, 3, 3, dtype=torch.bool)
    fake_term = torch.stack([-torch.log(1 - sig(z_fake[n, 0, h, w])) for n in range(2) for h in range(3)
                             for w in range(3) if valid[n, h, w]]).mean()
    real_term = (-torch.log(sig(z_real))).mean()
    assert loss_D(z_fake, valid, z_real, real_valid).item() == pytest.approx((0.5 * fake_term + 0.5 * real_term).item(),
                                                                             rel=1e-9)


def test_loss_semi_direct_and_constant_mask():
    pred = _logits(2, 4, 3, 3).requires_grad_(True)
    z = _logits(2, 1, 3, 3).requires_grad_(True)
    t = 0.5
    loss, keep = loss_semi(pred, z, t)
    conf, target, logp = torch.sigmoid(z.detach()), pred.detach().argmax(1), torch.log_softmax(pred.detach(), 1)
    terms = [-logp[n, target[n, h, w], h, w] for n in range(2) for h in range(3) for w in range(3) if conf[n, 0, h, w] >= t]
    assert len(terms) == int(keep.sum()) > 0
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-10)   # mean over kept pixels only
    assert torch.equal(keep, conf[:, 0] >= t)
    loss.backward()
    assert z.grad is None or not z.grad.any()                                        # mask is a constant
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_loss_seg_is_the_weighted_sum():
    assert loss_seg(1.0, 2.0, 3.0, 4.0, 0.01, 0.001, 0.1) == pytest.approx(1 + 0.02 + 0.003 + 0.4)


def test_gradient_isolation():
    model = DeepLabV2(3, "resnet18", (1, 2, 3, 4), width=8)
    D = FCDiscriminator(3, ndf=8)
    x = torch.randn(2, 3, 64, 64)
    D.requires_grad_(False)
    pred = hung2018.up(model(x), (64, 64))
    loss_adv(hung2018.up(D(F.softmax(pred, 1)), (64, 64))).backward()
    assert all(p.grad is None for p in D.parameters())
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    D.requires_grad_(True)
    z = hung2018.up(D(F.softmax(pred.detach(), 1)), (64, 64))
    loss_D(z, torch.ones(2, 64, 64, dtype=torch.bool), z, torch.ones(2, 64, 64, dtype=torch.bool)).backward()
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is not None for p in D.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Networks (card 4 and 10)
# ---------------------------------------------------------------------------------------------------------------
def test_deeplab_names_counts_and_torchvision_loading(capsys):
    import torchvision
    model = DeepLabV2(21)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (n_all, n_train) == (44_048_532, 43_943_188)                                 # card 4.1
    assert sum(p.numel() for p in model.layer5.parameters()) == 1_548_372
    tv = torchvision.models.resnet101(weights=None).state_dict()                         # no download: random weights
    aspp = {f"layer5.conv2d_list.{i}.{t}" for i in range(4) for t in ("weight", "bias")}
    assert set(model.state_dict()) == (set(tv) - {"fc.weight", "fc.bias"}) | aspp          # card 4.2 names
    layer5_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("layer5.")}
    matched, missing, unused = hung2018.load_pretrained(model, tv, "torchvision resnet101")
    assert len(matched) == 624 and missing == [] and unused == ["fc.bias", "fc.weight"]
    assert torch.equal(model.state_dict()["layer3.7.conv2.weight"], tv["layer3.7.conv2.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in layer5_before.items())
    assert "loaded 624/624 backbone tensors" in capsys.readouterr().out
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)   # Caffe: stride in 1x1
    assert model.layer3[0].conv2.dilation == (2, 2) and model.layer4[0].conv2.dilation == (4, 4)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 321, 321)).shape == (1, 21, 41, 41)


def test_ceil_mode_output_sizes():
    small = DeepLabV2(19, "resnet18", width=8).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 512, 1024)).shape == (1, 19, 65, 129)              # card 10.1
        assert small(torch.randn(1, 3, 505, 505)).shape == (1, 19, 64, 64)


def test_aspp_two_branch_quirk():
    aspp = hung2018.ASPP(16, 3, branches=2)
    x = torch.randn(1, 16, 9, 9)
    c = aspp.conv2d_list
    assert torch.allclose(aspp(x), c[0](x) + c[1](x))
    with torch.no_grad():
        c[2].weight.add_(1.0), c[3].weight.add_(1.0)
    assert torch.allclose(aspp(x), c[0](x) + c[1](x))
    aspp.branches = 4
    assert torch.allclose(aspp(x), c[0](x) + c[1](x) + c[2](x) + c[3](x))


def test_discriminator_shape_and_count():
    D = FCDiscriminator(21)
    assert sum(p.numel() for p in D.parameters()) == 2_783_169                           # card 4.3
    assert sum(p.numel() for p in FCDiscriminator(19).parameters()) == 2_781_121
    assert D(torch.randn(1, 21, 321, 321)).shape == (1, 1, 10, 10)
    assert FCDiscriminator(21, fcd=False)(torch.randn(2, 21, 64, 64)).shape == (2, 1, 1, 1)


def test_bn_frozen_affine_and_statistics():
    model = DeepLabV2(3, "resnet18", (1, 2, 3, 4), width=8)
    args = hung2018.resolve_args(hung2018.get_parser().parse_args(["--data", "synthetic"]))
    opt_S, _ = hung2018.make_optimizers(model, FCDiscriminator(3, ndf=8), args)
    in_opt = {id(p) for g in opt_S.param_groups for p in g["params"]}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert not m.weight.requires_grad and id(m.weight) not in in_opt and id(m.bias) not in in_opt
    for freeze, changes in ((False, True), (True, False)):
        before = model.bn1.running_mean.clone()
        hung2018.set_train_mode(model, freeze)
        model(torch.randn(2, 3, 32, 32))
        assert (not torch.equal(before, model.bn1.running_mean)) == changes


def test_poly_schedule_and_official_optimizer():
    model = DeepLabV2(3, "resnet18", (1, 2, 3, 4), width=8)
    D = FCDiscriminator(3, ndf=8)
    args = hung2018.resolve_args(hung2018.get_parser().parse_args(
        ["--data", "voc", "--official-quirks", "--num-steps", "100"]))                   # the paper's schedule
    assert args.weight_decay == 5e-4 and args.aspp_branches == 2 and args.nesterov is False
    opt_S, opt_D = hung2018.make_optimizers(model, D, args)
    hung2018.poly_lr(opt_S, opt_D, 0, args)
    assert (opt_S.param_groups[0]["lr"], opt_S.param_groups[1]["lr"], opt_D.param_groups[0]["lr"]) == \
        pytest.approx((2.5e-4, 2.5e-3, 1e-4))
    hung2018.poly_lr(opt_S, opt_D, 50, args)
    assert opt_S.param_groups[0]["lr"] == pytest.approx(2.5e-4 * 0.5 ** 0.9)
    # sub-steps: stem 1, block conv 3, downsample 4 (card 5.1.5), checked against a hand-written momentum SGD
    named = dict(model.named_parameters())
    for name, k in (("conv1.weight", 1), ("layer1.0.conv1.weight", 3), ("layer2.0.downsample.0.weight", 4)):
        p = named[name]
        p.grad = torch.ones_like(p)
        w0 = p.detach().clone()
        ref, buf, d_p = w0.clone(), torch.zeros_like(w0), torch.ones_like(w0)
        for _ in range(k):
            d_p = d_p + 5e-4 * ref                           # PyTorch 0.3: the decay accumulates in p.grad
            buf = 0.9 * buf + d_p
            ref = ref - opt_S.param_groups[0]["lr"] * buf
        opt_S.step()
        assert torch.allclose(p.detach(), ref, atol=1e-7), name
        for q in model.parameters():
            q.grad = None
        opt_S.state.clear()


# ---------------------------------------------------------------------------------------------------------------
# Data and metrics
# ---------------------------------------------------------------------------------------------------------------
def test_miou_hand_made():
    cm = common.ConfusionMatrix(3)
    lab = torch.tensor([[0, 1, 255]])
    cm.update(lab.clamp(max=2), lab)                 # perfect where labeled; the 255 pixel predicted "2" is skipped
    r = cm.compute()
    assert r["miou"] == 1.0 and r["iou"][2] is None   # class 2 absent from prediction and truth: not counted as 0
    # dataset-level IoU differs from the mean of per-image IoUs
    a_pred, a_lab = torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 0]])
    b_pred, b_lab = torch.tensor([[0, 0]]), torch.tensor([[0, 1]])
    cm = common.ConfusionMatrix(2)
    cm.update(a_pred, a_lab), cm.update(b_pred, b_lab)
    ds = cm.compute()["miou"]
    per_image = []
    for p, l in ((a_pred, a_lab), (b_pred, b_lab)):
        c = common.ConfusionMatrix(2)
        c.update(p, l)
        per_image.append(c.compute()["miou"])
    assert ds == pytest.approx((1 / 3 + 3 / 5) / 2) and ds != pytest.approx(np.mean(per_image))


def test_split_fractions_and_file(tmp_path):
    ids = [f"i{k:05d}" for k in range(10582)]
    lab, unl = common.labeled_split(ids, 0.125, seed=0)
    assert (len(lab), len(unl)) == (1322, 9260) and not set(lab) & set(unl)           # card 5.1
    path = tmp_path / "split.txt"
    common.write_list(path, lab)
    assert common.labeled_split(ids, None, split_file=str(path))[0] == lab


def test_synthetic_is_deterministic_and_labeled():
    a, b = common.SyntheticSource(32, 6, 2, seed=3), common.SyntheticSource(32, 6, 2, seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    values = set(np.unique(a.labels).tolist())
    assert values <= set(range(6)) | {255} and 255 in values and len(values - {0, 255}) >= 2


def test_transforms_pad_scale_and_normalise():
    norm = common.Normalize("caffe", bgr=False)
    white = norm(np.full((1, 1, 3), 255, np.uint8))[0, 0]
    assert white == pytest.approx([255 - 122.67891434, 255 - 116.66876762, 255 - 104.00698793])   # card 10.11
    assert norm(np.full((1, 1, 3), 255, np.uint8))[0, 0, 0] != common.Normalize("caffe")(np.full((1, 1, 3), 255, np.uint8))[0, 0, 0]
    img, lab = np.full((10, 12, 3), 200, np.uint8), np.ones((10, 12), np.uint8)
    x, y, box = common.TrainTransform(norm, crop=(16, 16))(img, lab, __import__("random").Random(0))
    assert x.shape == (3, 16, 16) and y.shape == (16, 16) and x.dtype == y.dtype == torch.uint8
    x = norm.batch(x[None], box[None])[0]                                             # on the device, as the loader
    assert (y == 255).sum() == 16 * 16 - 10 * 12 and (x[:, y == 255] == 0).all()        # padding: 0 and 255
    scales = {common.TrainTransform(norm, scales=[0.5 + k / 10 for k in range(12)])(img, lab, __import__("random").Random(s))[1].shape
              for s in range(60)}
    assert len(scales) > 5
    g = common.LabelTransform(crop=(16, 16))(lab, __import__("random").Random(0))
    assert g.shape == (16, 16) and not (g == 255).any()                               # D's real maps: never padded


def test_cityscapes_mapping(tmp_path):
    for split in ("train", "val"):
        d, g = tmp_path / "leftImg8bit" / split / "aachen", tmp_path / "gtFine" / split / "aachen"
        d.mkdir(parents=True), g.mkdir(parents=True)
        Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(d / "aachen_000000_000019_leftImg8bit.png")
        Image.fromarray(np.array([[7, 8, 26, 33, 0, 1, 4, 5]] * 4, np.uint8)).save(g / "aachen_000000_000019_gtFine_labelIds.png")
    with pytest.warns(UserWarning):
        src = common.CityscapesSource(str(tmp_path))
    assert src.splits["val"] == ["val/aachen/aachen_000000_000019"]
    _, lab = src.read(src.splits["train"][0])
    assert lab[0].tolist() == [0, 1, 13, 18, 255, 255, 255, 255]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback, no run folder that looks complete
# ---------------------------------------------------------------------------------------------------------------
def make_voc(root, n_train=6, n_val=2, bad_label=None, bad_image=None):
    base = root / "VOC2012"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"2007_{k:06d}" for k in range(n_train + n_val)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{i}.jpg")
        lab = rng.integers(0, 21, (40, 48)).astype(np.uint8)
        lab[0] = 255
        Image.fromarray(lab).save(base / "SegmentationClassAug" / f"{i}.png")
    if bad_label:
        lab = np.zeros((40, 48), np.uint8)
        lab[5, 5] = 30
        for i in ids:
            Image.fromarray(lab).save(base / "SegmentationClassAug" / f"{i}.png")
    if bad_image:
        for i in ids:
            (base / "JPEGImages" / f"{i}.jpg").write_bytes(b"not a jpeg")
    (base / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return ids


VOC_SMALL = ["--data", "voc", "--backbone", "resnet18", "--width", "8", "--init", "none", "--num-steps", "2",
             "--batch-size", "2", "--crop-size", "33", "33", "--labeled", "0.5", "--log-every", "1"]


def test_voc_layout_end_to_end(tmp_path):
    make_voc(tmp_path / "voc")
    out = str(tmp_path / "run")
    metrics = run_main(VOC_SMALL + ["--data-root", str(tmp_path / "voc"), "--out", out])
    assert 0 <= metrics["miou"] <= 1 and len(metrics["iou"]) == 21


def expect_error(capsys, argv, *fragments, out=None):
    with pytest.raises(SystemExit) as e:
        run_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for f in fragments:
        assert f in err[0], (f, err[0])
    if out is not None:
        assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_bad_inputs(tmp_path, capsys):
    expect_error(capsys, ["--data", "voc", "--data-root", str(tmp_path / "nowhere")], "does not exist")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["--data", "voc", "--data-root", str(tmp_path / "empty")], "VOC2012/JPEGImages")
    expect_error(capsys, ["--data", "cityscapes", "--data-root", str(tmp_path / "empty")], "leftImg8bit")
    expect_error(capsys, ["--data", "imagenet"], "unknown --data")
    expect_error(capsys, ["--data", "synthetic", "--labeled", "0"], "(0, 1]")
    expect_error(capsys, ["--data", "synthetic", "--labeled", "1.5"], "(0, 1]")
    expect_error(capsys, ["--data", "synthetic", "--labeled", "abc"], "invalid float")
    split = tmp_path / "split.txt"
    split.write_text("syn00001\nnot_an_id\n")
    expect_error(capsys, ["--data", "synthetic", "--split", str(split)], "not_an_id")
    expect_error(capsys, ["--data", "synthetic", "--resume", str(tmp_path / "empty")], "nothing to resume")


def test_bad_label_and_image(tmp_path, capsys):
    make_voc(tmp_path / "a", bad_label=True)
    out = str(tmp_path / "ra")
    expect_error(capsys, VOC_SMALL + ["--data-root", str(tmp_path / "a"), "--out", out], "contains value 30", out=out)
    make_voc(tmp_path / "b", bad_image=True)
    out = str(tmp_path / "rb")
    expect_error(capsys, VOC_SMALL + ["--data-root", str(tmp_path / "b"), "--out", out], "cannot read image",
                 ".jpg", out=out)
    # the same errors raised inside a loader worker process are still one line
    expect_error(capsys, VOC_SMALL + ["--data-root", str(tmp_path / "b"), "--out", out + "w", "--workers", "1"],
                 "cannot read image", out=out + "w")


def test_bad_checkpoints(tmp_path, capsys):
    wrong = tmp_path / "r18.pth"
    torch.save(DeepLabV2(6, "resnet18", width=8).state_dict(), wrong)
    expect_error(capsys, ["--data", "synthetic", "--init", "coco", "--restore-from", str(wrong)], "other shapes")
    nothing = tmp_path / "nothing.pth"
    torch.save({"foo.weight": torch.zeros(3)}, nothing)
    expect_error(capsys, ["--data", "synthetic", "--init", "coco", "--restore-from", str(nothing)],
                 "matches no backbone tensor")
    expect_error(capsys, ["--data", "synthetic", "--init", "coco", "--restore-from", str(tmp_path / "missing.pth")],
                 "does not exist")
    # a resume checkpoint that does not fit the run's network
    out = tmp_path / "run"
    run_main(["--data", "synthetic", "--out", str(out), "--stop-at", "2"] + TINY)
    args = json.loads((out / "args.json").read_text())
    args["width"] = 16
    (out / "args.json").write_text(json.dumps(args))
    expect_error(capsys, ["--data", "synthetic", "--resume", str(out)], "does not fit")


# ===============================================================================================================
# latent_classes.py (Sawatzky et al.; card ../shared/methods/latent_classes.md, sec. 11)
# ===============================================================================================================
import latent_classes as lc  # noqa: E402  (kept beside its tests so each script's section reads on its own)

LC_TINY = ["--num-steps", "4", "--cons-start", "2", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
           "--num-pictures", "2", "--num-latent", "5"]


def _probs(*shape, seed=0):
    return torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 1)


def _labels(n, h, w, C, seed=0):
    return torch.randint(0, C, (n, h, w), generator=torch.Generator().manual_seed(seed))


def test_lc_end_to_end_synthetic(tmp_path, capsys):
    out = str(tmp_path / "run")
    metrics = lc.main(["--data", "synthetic", "--out", out] + LC_TINY)
    assert 0.0 <= metrics["miou"] <= 1.0
    for name in ("args.json", "labeled.txt", "log.jsonl", "last.pt", "metrics.json", "predictions.png",
                 "p_l_given_c.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    log, final = read_log(out)[:-1], read_log(out)[-1]
    assert [r["iter"] for r in log] == [1, 2, 3, 4]
    assert final == {"iter": 4, "val_miou": metrics["miou"]}                        # the final evaluation, appended
    for r in log:                                     # card 11.7: everything but L_cons from iteration 0
        for k in ("loss_ce", "loss_latent", "loss_adv", "loss_adv_u", "loss_D"):
            assert math.isfinite(r[k]), (k, r)
    assert [("loss_cons" in r) for r in log] == [False, False, True, True]          # L_cons from --cons-start
    assert "alpha 0.03200" in capsys.readouterr().out                             # alpha = N / labeled = 4 / 125
    M = torch.load(os.path.join(out, "last.pt"), weights_only=True)["M"]
    assert M.dtype == torch.float64 and M.shape == (6, 5) and (M > 0).all()
    P = torch.tensor(metrics["p_l_given_c"])
    assert P.shape == (6, 5) and torch.allclose(P.sum(1), torch.ones(6), atol=1e-4)
    assert set(metrics["effective_latent"]) == {"0.1", "0.9"} and metrics["cons_grad"] == "semantic"


def test_lc_resume_gives_the_same_losses_and_M(tmp_path):
    straight, parted = str(tmp_path / "a"), str(tmp_path / "b")
    lc.main(["--data", "synthetic", "--out", straight] + LC_TINY)
    assert lc.main(["--data", "synthetic", "--out", parted, "--stop-at", "2"] + LC_TINY) is None
    lc.main(["--data", "synthetic", "--resume", parted])
    a, b = read_log(straight), read_log(parted)
    assert [r["iter"] for r in b] == [1, 2, 3, 4, 4] and set(b[-1]) == {"iter", "val_miou"}   # + the final val mIoU
    for ra, rb in zip(a, b):
        for k in ("loss_ce", "loss_latent", "loss_adv", "loss_adv_u", "loss_cons", "loss_D"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra["iter"])
    Ma = torch.load(os.path.join(straight, "last.pt"), weights_only=True)["M"]
    Mb = torch.load(os.path.join(parted, "last.pt"), weights_only=True)["M"]
    assert torch.allclose(Ma, Mb, rtol=1e-4)                                        # M restored on resume


def test_lc_baseline_mode_and_shared_substrate(tmp_path):
    base = str(tmp_path / "base")
    lc.main(["--data", "synthetic", "--out", base, "--lambda-latent", "0", "--lambda-cons", "0", "--lambda-adv", "0",
             "--lambda-adv-unl", "0"] + LC_TINY)
    assert set(read_log(base)[0]) == {"iter", "loss_ce", "img_per_s", "lr"}           # Table 3 baseline: L_ce only
    assert not os.path.exists(os.path.join(base, "p_l_given_c.png"))               # latent head never run
    # card 11.10: with the latent terms off, the first iteration's L_ce is hung2018's (same backbone, layer5, data):
    # their synthetic pretrained starts, built separately under two tags, are the same weights
    hung = str(tmp_path / "hung")
    run_main(["--data", "synthetic", "--out", hung, "--init", "synthetic", "--lambda-semi", "0", "--stop-at", "1"]
             + TINY)
    lat = str(tmp_path / "lat")
    lc.main(["--data", "synthetic", "--out", lat, "--init", "synthetic", "--lambda-latent", "0", "--lambda-cons", "0",
             "--stop-at", "1"] + LC_TINY)
    assert read_log(hung)[0]["loss_ce"] == pytest.approx(read_log(lat)[0]["loss_ce"], rel=1e-6)


def test_lc_loss_latent_direct_and_properties():
    C, L = 4, 3
    prob_l = _probs(2, L, 5, 6, seed=1).requires_grad_(True)
    y = _labels(2, 5, 6, C, seed=2)
    y[y == 3] = 0                                              # class 3 absent from the batch (card 11.3e)
    y[0, 0, :] = 255
    valid = y != 255
    V = int(valid.sum())
    J = torch.zeros(C, L, dtype=torch.float64)
    for n in range(2):
        for h in range(5):
            for w in range(6):
                if valid[n, h, w]:
                    J[y[n, h, w]] += prob_l[n, :, h, w].detach()
    J /= V                                                     # Eq. (2), divided by the valid pixels
    assert (lc.cooccurrence(prob_l.detach(), y, C) / V).sum().item() == pytest.approx(1.0)   # (g) a distribution
    direct = -sum(J[c, l] * math.log(J[c, l] / J[:, l].sum()) for c in range(C) for l in range(L) if J[c, l] > 0)
    loss, cooc = lc.loss_latent(prob_l, y, C, norm="valid")
    assert not cooc.requires_grad and torch.allclose(cooc / V, J)                    # the sums M is updated with
    assert loss.item() == pytest.approx(float(direct), rel=1e-6)
    loss.backward()
    assert torch.isfinite(prob_l.grad).all()                                        # (e) no NaN with an absent class
    assert prob_l.grad[0, :, 0, :].abs().max() == 0                                 # (d) 255 pixels: no gradient
    norm_all = lc.loss_latent(prob_l.detach(), y, C)[0]                    # Eq. (2)'s N*H*W; deviation 3: a factor
    assert norm_all.item() == pytest.approx(loss.item() * V / y.numel(), rel=1e-6)
    assert lc.loss_latent(prob_l.detach()[:, [2, 0, 1]], y, C, norm="valid")[0].item() == \
        pytest.approx(loss.item(), rel=1e-9)                                                               # (c)
    # (a) one-hot latent, each latent class holding one semantic class: 0; (b) all mass in one latent class: H(C)
    y2 = _labels(2, 5, 6, 3, seed=3)
    pure = F.one_hot(y2, 3).permute(0, 3, 1, 2).double()
    assert lc.loss_latent(pure, y2, 3)[0].item() == pytest.approx(0.0, abs=1e-6)
    one = torch.zeros(2, 3, 5, 6, dtype=torch.float64)
    one[:, 1] = 1
    freq = torch.bincount(y2.flatten(), minlength=3).double() / y2.numel()
    H_C = -(freq * freq.log()).sum()
    assert lc.loss_latent(one, y2, 3)[0].item() == pytest.approx(H_C.item(), rel=1e-6)


def test_lc_M_and_p_l_given_c():
    C, L = 3, 4
    M = torch.zeros(C, L, dtype=torch.float64)
    assert torch.allclose(lc.p_l_given_c(M), torch.full((C, L), 0.25, dtype=torch.float64))   # unseen: uniform rows
    prob_l = _probs(2, L, 4, 4, seed=4)
    y = _labels(2, 4, 4, C, seed=5)
    y[y == 2] = 1                                              # class 2 never seen
    cooc = lc.cooccurrence(prob_l, y, C)
    lc.update_M(M, cooc, alpha=0.3)
    P = lc.p_l_given_c(M)
    assert torch.allclose(P[:2], cooc[:2] / cooc[:2].sum(1, keepdim=True))          # whatever alpha is
    assert torch.allclose(P[2], torch.full((L,), 0.25, dtype=torch.float64))
    lc.update_M(M, 2 * cooc, alpha=0.5)                                             # Eq. (8) by hand
    assert torch.allclose(M, 0.5 * 0.3 * cooc + 0.5 * 2 * cooc)
    eff = torch.tensor([[0.95, 0.05, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    assert (lc.effective_latent(eff, 0.1), lc.effective_latent(eff, 0.9)) == (2, 1)   # Table 4; row 2 unseen


def test_lc_map_to_latent_and_loss_cons_direct():
    C, L = 3, 2
    prob_c = _probs(2, C, 3, 3, seed=6)
    P = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    s_hat = lc.map_to_latent(prob_c, P)
    assert torch.allclose(s_hat.sum(1), torch.ones(2, 3, 3, dtype=torch.float64))
    assert torch.allclose(lc.map_to_latent(prob_c, torch.eye(C, dtype=torch.float64)), prob_c)   # C = L, identity
    pred_u, lat_u = _logits(2, C, 3, 3), _logits(2, L, 3, 3)
    s_l, s_c = torch.softmax(lat_u, 1), torch.softmax(pred_u, 1)
    terms = [-sum(s_l[n, l, h, w] * math.log(sum(P[c, l] * s_c[n, c, h, w] for c in range(C))) for l in range(L))
             for n in range(2) for h in range(3) for w in range(3)]
    assert lc.loss_cons(pred_u, lat_u, P).item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-9)


@pytest.mark.parametrize("mode, sem, lat", [("semantic", True, False), ("latent", False, True), ("both", True, True)])
def test_lc_gradient_routing(mode, sem, lat):
    torch.manual_seed(0)
    model = lc.DeepLabV2(3, 4, "resnet18", (1, 2, 3, 4), width=8)
    P = lc.p_l_given_c(torch.rand(3, 4, dtype=torch.float64)).requires_grad_(True)
    pred, latent = model(torch.randn(2, 3, 48, 48))
    lc.loss_cons(pred, latent, P, mode).backward()                                # card 11.6
    has = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert (has(model.layer5), has(model.layer6), has(model.layer4)) == (sem, lat, True)
    assert P.grad is None                                                         # P(l | c) is a constant
    model.zero_grad(set_to_none=True)
    pred, latent = model(torch.randn(2, 3, 48, 48))
    y = torch.randint(0, 3, (2, 48, 48))
    lc.loss_latent(F.softmax(lc.up(latent, (48, 48)), 1), y, 3)[0].backward()     # card 11.3f
    assert (has(model.layer5), has(model.layer6), has(model.layer4)) == (False, True, True)


def test_lc_network_counts_and_loading(capsys):
    import torchvision
    model = lc.DeepLabV2(21, 20)
    assert sum(p.numel() for p in model.layer6.parameters()) == 1_474_640            # card 11.2
    assert sum(p.numel() for p in model.parameters()) == 45_523_172
    assert sum(p.numel() for p in lc.FCDiscriminator(21).parameters()) == 2_783_169
    assert lc.FCDiscriminator(21).conv1.in_channels == 21                            # D sees C channels, never L
    with torch.no_grad():
        assert lc.FCDiscriminator(21)(torch.rand(1, 21, 321, 321)).shape == (1, 1, 10, 10)   # card 11.1
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("layer5.", "layer6."))}
    tv = torchvision.models.resnet101(weights=None).state_dict()
    matched, missing, unused = lc.load_pretrained(model, tv, "torchvision resnet101")
    assert len(matched) == 624 and missing == [] and unused == ["fc.bias", "fc.weight"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in heads.items())    # heads never loaded
    with torch.no_grad():
        sem, lat = model.eval()(torch.randn(1, 3, 321, 321))
    assert sem.shape == (1, 21, 41, 41) and lat.shape == (1, 20, 41, 41)
    capsys.readouterr()


def test_lc_bad_inputs(tmp_path, capsys):
    def expect(argv, fragment):
        with pytest.raises(SystemExit) as e:
            lc.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and fragment in err[0], err
    expect(["--data", "synthetic", "--num-latent", "0"], "--num-latent")
    expect(["--data", "synthetic", "--labeled", "2"], "(0, 1]")
    expect(["--data", "pascal"], "unknown --data")
    expect(["--data", "synthetic", "--cons-grad", "sideways"], "invalid choice")
    expect(["--data", "synthetic", "--resume", str(tmp_path)], "nothing to resume")
    expect(["--data", "synthetic", "--labeled", "0.002"], "alpha")                   # 8 / 2 > 1: M would go negative
    out = tmp_path / "run"
    lc.main(["--data", "synthetic", "--out", str(out), "--stop-at", "2"] + LC_TINY)
    M = torch.load(out / "last.pt", weights_only=True)["M"]
    assert (M > 0).all()                                       # card 11.7: M updated before L_cons starts (at 2)
    args = json.loads((out / "args.json").read_text())
    args["num_latent"] = 7                                      # the checkpoint's layer6 and M no longer fit
    (out / "args.json").write_text(json.dumps(args))
    expect(["--data", "synthetic", "--resume", str(out)], "does not fit")


def test_lc_unlabeled_labels_never_read_and_full_labels(tmp_path, monkeypatch):
    split = tmp_path / "split.txt"
    split.write_text("\n".join(f"syn{k:05d}" for k in range(0, 1000, 2)) + "\n")      # even ids labeled
    argv = ["--data", "synthetic", "--split", str(split), "--stop-at", "2"] + LC_TINY
    lc.main(argv + ["--out", str(tmp_path / "clean")])
    read = common.SyntheticSource.read

    def scrambled(self, i):                                    # odd (unlabeled) ids get random labels
        img, lab = read(self, i)
        return (img, np.random.randint(0, 6, lab.shape).astype(np.uint8)) if int(i[3:]) % 2 else (img, lab)
    monkeypatch.setattr(common.SyntheticSource, "read", scrambled)
    lc.main(argv + ["--out", str(tmp_path / "scrambled")])
    assert read_log(tmp_path / "clean") == [{**r, "img_per_s": a["img_per_s"]} for r, a in
                                            zip(read_log(tmp_path / "scrambled"), read_log(tmp_path / "clean"))]
    monkeypatch.undo()
    full = str(tmp_path / "full")                              # card 10.21: no unlabeled stream, D on labeled fakes
    lc.main(["--data", "synthetic", "--labeled", "1.0", "--out", full] + LC_TINY)
    assert all("loss_latent" in r and "loss_D" in r and "loss_adv_u" not in r and "loss_cons" not in r
               for r in read_log(full)[:-1])                   # the last record: the final val mIoU


# ===============================================================================================================
# common.py pieces for luc2016.py (card ../shared/methods/luc2016.md, sec. 9-10): Stanford Background, BF score
# ===============================================================================================================
def _bf_direct(pred, gt, num_classes, theta):
    """BF with explicit pairwise distances between contour pixels (torch.cdist), for comparison."""
    pred, gt = torch.as_tensor(pred), torch.as_tensor(gt)
    scores = []
    for c in range(num_classes):
        P, G = (pred == c) & (gt != 255), gt == c
        if not (P.any() or G.any()):
            continue
        if P.any() != G.any():
            scores.append(0.0)
            continue
        bp, bg = [torch.nonzero(common._boundaries(m[None])[0]).float() for m in (P, G)]
        if len(bp) == 0 and len(bg) == 0:
            scores.append(1.0)
            continue
        if len(bp) == 0 or len(bg) == 0:
            scores.append(0.0)
            continue
        d = torch.cdist(bp, bg)
        prec, rec = (d.min(1).values <= theta).float().mean(), (d.min(0).values <= theta).float().mean()
        scores.append(0.0 if prec + rec == 0 else float(2 * prec * rec / (prec + rec)))
    return sum(scores) / len(scores)


def test_boundary_f1_hand_made_and_direct():
    gt = np.zeros((40, 50), np.int64)
    gt[10:25, 12:30] = 1
    assert common.boundary_f1(gt, gt, 3, 5.0) == 1.0                                  # identical
    shifted = np.zeros_like(gt)
    shifted[14:29, 12:30] = 1                                                         # 4 px down: within 5 px
    assert common.boundary_f1(shifted, gt, 3, 5.0) == 1.0
    far = np.zeros_like(gt)
    far[18:33, 12:30] = 1                                                             # 8 px down
    assert common.boundary_f1(far, gt, 3, 5.0) < 1.0
    assert common.boundary_f1(np.zeros_like(gt), gt, 3, 5.0) == 0.0                  # class 1 missed: F_1 = 0, F_0 = 0
    assert common.boundary_f1(np.zeros_like(gt), np.zeros_like(gt), 3, 5.0) == 1.0   # one class fills both
    rng = np.random.default_rng(0)
    for _ in range(5):                                                                # random blobs vs cdist
        g = (rng.random((30, 36)) < 0.5).astype(np.int64) + (rng.random((30, 36)) < 0.2)
        g = np.kron(g[::3, ::3], np.ones((3, 3), np.int64))
        p = np.roll(g, rng.integers(-3, 4), axis=1)
        g[rng.random(g.shape) < 0.05] = 255
        theta = float(rng.uniform(1, 6))
        assert common.boundary_f1(p, g, 3, theta) == pytest.approx(_bf_direct(p, g, 3, theta), abs=1e-6)
    assert common.bf_tolerances([(240, 320), (480, 640), (300, 400)]) == pytest.approx([5.0, 10.0, 6.25])


def make_stanford(root, n=715, bad=None, size=(4, 6)):
    base = root / "iccv09Data"
    (base / "images").mkdir(parents=True)
    (base / "labels").mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        i = f"{k:07d}"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(base / "images" / f"{i}.jpg")
        lab = rng.integers(-1, 8, size)
        if bad == "value" and k == 3:
            lab[0, 0] = 8
        if bad == "shape" and k == 3:
            lab = lab[:3]
        (base / "labels" / f"{i}.regions.txt").write_text("\n".join(" ".join(map(str, r)) for r in lab) + "\n")
    return base


def test_stanford_background_layout_split_and_labels(tmp_path):
    base = make_stanford(tmp_path / "sb")
    src = common.make_source("stanford", str(tmp_path / "sb"))
    assert (len(src.splits["train"]), len(src.splits["val"])) == (573, 142)
    assert not set(src.splits["train"]) & set(src.splits["val"])
    assert src.splits == common.StanfordBackgroundSource(str(base)).splits        # root or root/iccv09Data; seeded
    assert src.splits != common.StanfordBackgroundSource(str(base), split_seed=1).splits
    img, lab = src.read("0000005")
    raw = np.loadtxt(base / "labels" / "0000005.regions.txt", dtype=np.int64)
    assert img.shape == (4, 6, 3) and lab.dtype == np.uint8
    assert np.array_equal(lab, np.where(raw < 0, 255, raw))                           # unknown (-1) -> ignore
    bad = make_stanford(tmp_path / "bv", n=5, bad="value")
    with pytest.warns(UserWarning, match="715"):
        src = common.StanfordBackgroundSource(str(bad))
    with pytest.raises(common.DataError, match="contains value 8"):
        src.read("0000003")
    bad = make_stanford(tmp_path / "bs", n=5, bad="shape")
    with pytest.warns(UserWarning):
        src = common.StanfordBackgroundSource(str(bad))
    with pytest.raises(common.DataError, match="3x6 but its image is 4x6"):
        src.read("0000003")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.DataError, match="iccv09Data/images"):
        common.make_source("stanford", str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------------------------
# luc2016.py (method card ../shared/methods/luc2016.md, section 14)
# ---------------------------------------------------------------------------------------------------------------
import luc2016  # noqa: E402

LUC_TINY = ["--num-steps", "4", "--batch-size", "4", "--log-every", "1", "--save-every", "2", "--num-pictures", "2"]


@pytest.mark.parametrize("encoding", ["basic", "product", "scaling"])
def test_luc_end_to_end_synthetic(tmp_path, encoding):
    out = str(tmp_path / encoding)
    m = luc2016.main(["--data", "synthetic", "--out", out, "--encoding", encoding] + LUC_TINY)
    for name in ("args.json", "labeled.txt", "val.txt", "log.jsonl", "last.pt", "metrics.json", "predictions.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert 0 <= m["miou"] <= 1 and 0 <= m["mean_acc"] <= 1 and 0 <= m["bf_mean"] <= 1 and m["bf_images"] == 200
    log = [r for r in read_log(out) if "val_miou" not in r]             # the final evaluation's record left out
    assert [r["iter"] for r in log] == [1, 2, 3, 4] and [r["s_updates"] for r in log] == [1, 2, 3, 4]
    for r in log:                                         # fast alternation: both networks every iteration
        for k in ("loss_mce", "loss_adv", "loss_a", "acc_real", "acc_fake"):
            assert math.isfinite(r[k]), (k, r)
    with open(os.path.join(out, "labeled.txt")) as f:
        assert len(f.read().split()) == 1000                              # fully supervised: --labeled 1.0


def test_luc_baseline_resume_and_same_seed(tmp_path):
    base = str(tmp_path / "base")
    luc2016.main(["--data", "synthetic", "--out", base, "--lambda-adv", "0"] + LUC_TINY)
    assert set(read_log(base)[0]) >= {"loss_mce"} and "loss_a" not in read_log(base)[0]
    straight, parted = str(tmp_path / "a"), str(tmp_path / "b")
    luc2016.main(["--data", "synthetic", "--out", straight] + LUC_TINY)
    assert luc2016.main(["--data", "synthetic", "--out", parted, "--stop-at", "2"] + LUC_TINY) is None
    luc2016.main(["--data", "synthetic", "--resume", parted])
    a, b = [[r for r in read_log(d) if "val_miou" not in r] for d in (straight, parted)]
    assert [r["iter"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss_mce", "loss_adv", "loss_a"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4), (k, ra, rb)
    assert read_log(base)[0]["loss_mce"] == a[0]["loss_mce"]             # same seed: same first loss, either way


def test_luc_slow_schedule_updates_one_network_per_phase(tmp_path):
    args = luc2016.resolve_args(luc2016.get_parser().parse_args(["--data", "synthetic", "--alternation", "slow",
                                                                 "--num-steps", "1200"]))
    assert [luc2016.phase(g, args) for g in (0, 499, 500, 999, 1000)] == ["A", "A", "S", "S", "A"]
    assert luc2016.total_iterations(args) == 2700                      # 2 full cycles + A-phase + 200 S
    assert luc2016.s_updates_before(2700, args) == 1200 and luc2016.s_updates_before(750, args) == 250
    args.lambda_adv = 0
    assert luc2016.phase(0, args) == "S" and luc2016.total_iterations(args) == 1200
    # iteration 0 (A-phase) changes only a, iteration 1 (S-phase) only s
    out = str(tmp_path / "slow")
    argv = ["--data", "synthetic", "--out", out, "--alternation", "slow", "--phase-length", "1", "--save-every", "1",
            "--batch-size", "2", "--num-steps", "1", "--log-every", "1", "--init", "none"]
    torch.manual_seed(0)                                 # the synthetic preset's networks, as run() draws them
    s0, a0 = luc2016.MultiScaleNet(6, 8).state_dict(), luc2016.StanfordAdversary(6, pools=0).state_dict()
    luc2016.main(argv + ["--stop-at", "1"])
    ck1 = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert all(torch.equal(s0[k], ck1["model"][k]) for k in s0)
    assert not all(torch.equal(a0[k], ck1["A"][k]) for k in a0)
    luc2016.main(["--resume", out, "--data", "synthetic"])
    ck2 = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert all(torch.equal(ck1["A"][k], ck2["A"][k]) for k in a0)
    assert not all(torch.equal(ck1["model"][k], ck2["model"][k]) for k in s0)
    assert [r.get("loss_a") is not None for r in read_log(out) if "val_miou" not in r] == [True, False]


def test_luc_scaling_encoding_properties():
    g = torch.Generator().manual_seed(0)
    s = F.softmax(3 * torch.randn(2, 5, 6, 7, generator=g), 1)
    y = torch.randint(0, 5, (2, 6, 7), generator=g)
    y[0, 0, :3] = 255
    s[1, :, 2, 2] = torch.tensor([0.95, 0.02, 0.01, 0.01, 0.01])        # s_l >= tau: ybar = s
    y[1, 2, 2] = 0
    yb = luc2016.scaling_target(s, y, 0.9)
    valid = y != 255
    assert torch.allclose(yb.sum(1)[valid], torch.ones(int(valid.sum())), atol=1e-6)
    assert yb[0, :, 0, :3].abs().max() == 0                              # void pixels: zero vectors
    true = yb.gather(1, y.clamp(max=4)[:, None])[:, 0]
    assert (true[valid] >= 0.9 - 1e-6).all()
    assert torch.equal(yb[1, :, 2, 2], s[1, :, 2, 2])
    for n, i, j in [(0, 3, 4), (1, 5, 1), (1, 0, 6)]:                     # proportions of the other classes kept
        l = int(y[n, i, j])
        others = [c for c in range(5) if c != l]
        ratio = yb[n, others, i, j] / s[n, others, i, j]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
        expected = torch.clamp(s[n, l, i, j], min=0.9)                   # direct formula of Sec. 3.2
        assert float(yb[n, l, i, j]) == pytest.approx(float(expected), abs=1e-6)
        assert torch.allclose(yb[n, others, i, j], s[n, others, i, j] * (1 - expected) / (1 - s[n, l, i, j]), atol=1e-6)


def test_luc_product_and_void_handling():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (2, 5, 6), generator=g)
    y[:, 0, 0] = 255
    valid = y != 255
    image = torch.randn(2, 3, 5, 6, generator=g)
    enc = luc2016.encode(luc2016.one_hot(y, 4), valid, image, "product")
    assert enc.shape == (2, 12, 5, 6)                                     # 3C channels
    summed = enc.view(2, 4, 3, 5, 6).sum(1)                              # one-hot: the classes add up to the image
    assert torch.allclose(summed, image * valid[:, None])
    assert enc[:, :, 0, 0].abs().max() == 0
    assert torch.allclose(enc[0, 3 * 2 + 1], (y[0] == 2) * image[0, 1])  # class-major: channel 3c + k
    # void pixels: zero input and zero gradient from the adversarial term, for every encoding (card 14.7)
    for encoding in ("basic", "product", "scaling"):
        logits = torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)
        s = F.softmax(logits, 1)
        s.retain_grad()
        A = luc2016.Adversary(12 if encoding == "product" else 4, luc2016.ADVERSARIES["smallfov-light"])
        x_in = luc2016.encode(s, valid, image, encoding)
        assert x_in[:, :, 0, 0].abs().max() == 0
        luc2016.loss_adv(luc2016.adversary_logits(A, x_in, image)).backward()
        assert s.grad[:, :, 0, 0].abs().max() == 0 and s.grad.abs().sum() > 0


def test_luc_losses_direct():
    z = torch.randn(3, 1, 4, 5)
    zr = torch.randn(3, 1, 4, 5)
    sig = torch.sigmoid
    assert float(luc2016.loss_adv(z)) == pytest.approx(float(-torch.log(sig(z)).mean()), rel=1e-5)   # flipped label
    assert float(luc2016.loss_adv(z)) != pytest.approx(float(torch.log(1 - sig(z)).mean()), rel=1e-3)
    assert float(luc2016.loss_a(zr, z)) == pytest.approx(
        float(-torch.log(sig(zr)).mean() - torch.log(1 - sig(z)).mean()), rel=1e-5)
    logits, y = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    y[0, 0] = 255
    direct = -torch.stack([F.log_softmax(logits, 1)[n, y[n, i, j], i, j] for n in range(2) for i in range(3)
                           for j in range(3) if y[n, i, j] != 255]).mean()
    assert float(luc2016.loss_mce(logits, y)) == pytest.approx(float(direct), rel=1e-5)
    assert float(luc2016.loss_s(torch.tensor(1.0), torch.tensor(0.5), 2.0)) == 2.0
    z2 = torch.randn(2, 2, 3, 3)                                         # 2-way softmax == sigmoid(z1 - z0)
    assert torch.allclose(F.softmax(z2, 1)[:, 1:], sig(z2[:, 1:] - z2[:, :1]), atol=1e-6)


def test_luc_adversary_counts_shapes_and_fields_of_view():
    counts = {"largefov-light": (871490, 907778), "largefov": (2351170, 2387458),
              "smallfov-light": (490434, 526722), "smallfov": (1572802, 1609090)}       # card 5.1 / 14.1
    for name, (n21, n63) in counts.items():
        for c_in, n in ((21, n21), (63, n63)):
            A = luc2016.Adversary(c_in, luc2016.ADVERSARIES[name])
            assert sum(p.numel() for p in A.parameters()) == n, (name, c_in)
            assert A.net[-1].out_channels == 2
        assert A(torch.zeros(1, 63, 63, 63)).shape == (1, 1, 15, 15)
    for name, fov in (("largefov", 34), ("smallfov", 18)):             # card 14.2, ReLU -> identity, avg pools
        A = luc2016.Adversary(1, luc2016.ADVERSARIES[name])
        layers = [torch.nn.AvgPool2d(2, 2) if isinstance(m, torch.nn.MaxPool2d) else m for m in A.net
                  if not isinstance(m, torch.nn.ReLU)]
        for m in layers:
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.ones_(m.weight)
        x = torch.zeros(1, 1, 63, 63, requires_grad=True)
        torch.nn.Sequential(*layers)(x)[0, 0, 7, 7].backward()
        rows, cols = x.grad[0, 0].abs().sum(1).nonzero(), x.grad[0, 0].abs().sum(0).nonzero()
        assert (len(rows), len(cols)) == (fov, fov), name
    S = luc2016.StanfordAdversary(8)                                      # card 14.12
    p, im = torch.zeros(2, 8, 60, 80), torch.zeros(2, 3, 60, 80)
    assert S.label_branch(p).shape[1] == 64 and S.image_branch(im).shape[1] == 64
    assert S.trunk[0].in_channels == 128
    assert S(p, im).shape == (2, 1, 15, 20)                              # 16x fewer decisions than label pixels


def test_luc_segmenters_context_identity_and_vgg_loading(capsys):
    net = luc2016.MultiScaleNet(8, 4)
    assert net(torch.randn(1, 3, 80, 96)).shape == (1, 8, 20, 24)        # output stride 4
    x = luc2016.lcn(torch.rand(2, 3, 20, 24) * 50 + 7)
    assert torch.isfinite(x).all() and abs(float(x.mean())) < 0.1
    assert float(luc2016.lcn(torch.full((1, 3, 9, 9), 3.0)).abs().max()) < 1e-3  # flat image: no contrast
    ctx = luc2016.ContextModule(21, sigma=0.0)                          # card 14.9: identity on non-negative scores
    v = torch.rand(1, 21, 9, 11)
    assert torch.allclose(ctx(v), v, atol=1e-5)
    assert [c.out_channels for c in ctx.convs] == [42, 42, 84, 168, 336, 672, 672, 21]
    assert (luc2016.ContextModule(21)(v) - v).abs().max() < 0.1
    import torchvision
    tv = torchvision.models.vgg16().state_dict()
    model = luc2016.Dilated8(21)
    luc2016.load_vgg16(model, tv)
    assert torch.equal(model.conv1_1.weight, tv["features.0.weight"])
    assert torch.equal(model.conv5_3.bias, tv["features.28.bias"])
    assert torch.equal(model.fc6.weight.flatten(1), tv["classifier.0.weight"])
    assert torch.equal(model.fc7.weight.flatten(1), tv["classifier.3.weight"])
    assert model.conv5_1.dilation == (2, 2) and model.fc6.dilation == (4, 4)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 80)).shape == (1, 21, 8, 10)   # output stride 8 (504 -> 63)
        assert model(torch.zeros(1, 3, 100, 76)).shape == (1, 21, 13, 10)  # ceil for odd sizes (500 -> 63)


def test_luc_stanford_selection_and_bf_ids(tmp_path):
    make_stanford(tmp_path / "sb", n=40, size=(24, 32))
    with pytest.warns(UserWarning):
        out = str(tmp_path / "run")
        bf_ids = tmp_path / "bf.txt"
        src = common.StanfordBackgroundSource(str(tmp_path / "sb"))
        bf_ids.write_text("\n".join(src.splits["val"][:3]) + "\n")
        m = luc2016.main(["--data", "stanford", "--data-root", str(tmp_path / "sb"), "--out", out, "--width", "4",
                          "--crop-size", "24", "32", "--num-steps", "4", "--batch-size", "2", "--eval-every", "2",
                          "--save-every", "2", "--log-every", "2", "--bf-ids", str(bf_ids)])
    with open(os.path.join(out, "held_out.txt")) as f:
        held = f.read().split()
    with open(os.path.join(out, "labeled.txt")) as f:
        train = f.read().split()
    assert len(held) == 4 and len(train) == 28 and not set(held) & set(train)   # 1 of 8 folds of 32
    selected = [r for r in read_log(out) if "select_mean_acc" in r]
    assert [r["s_updates"] for r in selected] == [2, 4]                # every 2 updates, the last one included
    top = max(selected, key=lambda r: r["select_mean_acc"])            # first maximum wins (strict ">")
    assert m["reported"] == "best" and m["bf_images"] == 3
    assert m["best"]["s_updates"] == top["s_updates"] and m["best"]["selection_mean_acc"] == top["select_mean_acc"]
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["s_updates"] == top["s_updates"]


def test_luc_voc_table2_lookup_and_label_alignment():
    parse = lambda *a: luc2016.resolve_args(luc2016.get_parser().parse_args(
        ["--data", "voc", "--restore-from", "x.pt", *a]))
    a = parse()                                                         # LargeFOV + Product (supp. Table 2)
    assert (a.adversary, a.encoding, a.lr, a.lr_d, a.lambda_adv) == ("largefov", "product", 1e-6, 0.1, 1.0)
    a = parse("--adversary", "smallfov", "--encoding", "product")
    assert (a.lr, a.lr_d, a.lambda_adv) == (1e-4, 0.1, 0.1)
    a = parse("--adversary", "largefov-light", "--encoding", "basic", "--lr", "3e-5")
    assert (a.lr, a.lr_d, a.lambda_adv) == (3e-5, 0.5, 0.1)
    assert parse("--lambda-adv", "0").lr == 1e-6                        # baseline slr (Sec. 4)
    a = parse("--adversary", "stanford", "--lr", "1e-3", "--lr-d", "1e-3", "--lambda-adv", "2")
    assert (a.lr, a.lr_d, a.lambda_adv) == (1e-3, 1e-3, 2.0)
    assert (a.batch_size, a.crop_size, a.phase_length, a.num_steps, a.tau) == (10, (504, 504), 500, 10000, 0.9)
    # labels are read at each output cell's centre; the ceil-mode border cell beyond the image is void
    y = torch.arange(10)[None, None, :].expand(1, 3, 10).clone()       # label = column index
    assert luc2016.downsample_labels(y, (1, 3), 4)[0, 0].tolist() == [2, 6, 255]
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1, 0, 1] = 1.0                                            # only cell 1 says class 1
    v = luc2016.upsample_logits(logits, (4, 10), 4)[0, 1, 0]           # cell 1 covers pixels 4..7: centre 5.5
    assert v.shape == (10,) and float(v[5]) == float(v[6]) == float(v.max()) and float(v[4]) == float(v[7])


def test_luc_bad_inputs(tmp_path, capsys):
    for argv, msg in [(["--data", "voc", "--data-root", str(tmp_path), "--restore-from", "x.pt"], "no VOC2012"),
                      (["--data", "synthetic", "--segmenter", "dilated8", "--init", "dilated8"], "--restore-from"),
                      (["--data", "synthetic", "--init", "vgg16"], "from scratch"),
                      (["--data", "synthetic", "--val-folds", "1"], "--val-folds"),
                      (["--data", "synthetic", "--segmenter", "dilated8", "--init", "dilated8", "--restore-from",
                        "nope.pt"], "nope.pt"),
                      (["--data", "synthetic", "--bf-ids", "missing.txt"], "missing.txt"),
                      (["--data", "synthetic", "--tau", "1.5"], "--tau")]:
        with pytest.raises(SystemExit) as e:
            luc2016.main(argv + ["--out", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and "Traceback" not in err, (argv, err)


# ===============================================================================================================
# s4gan_mlmt.py (Mittal et al.; card ../shared/methods/s4gan_mlmt.md, sec. 10)
# ===============================================================================================================
import s4gan_mlmt as s4  # noqa: E402

S4_TINY = ["--num-steps", "4", "--batch-size", "4", "--log-every", "1", "--save-every", "2", "--num-pictures", "2",
           "--mlmt-epochs", "2", "--mlmt-batch-size", "16", "--mlmt-batch-size-unl", "8", "--mlmt-eval-every", "1",
           "--burn-in", "0", "--mlmt-size", "48"]


def test_s4_end_to_end_both_stages_and_fusion(tmp_path):
    out = str(tmp_path / "run")
    m = s4.main(["--data", "synthetic", "--out", out] + S4_TINY)
    for name in ("args.json", "labeled.txt", "log.jsonl", "last.pt", "mlmt_last.pt", "mlmt_val_scores.csv",
                 "metrics.json", "predictions.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert 0 <= m["miou"] <= 1 and 0 <= m["fused"]["miou"] <= 1 and set(m["iou"]) == set(common.SyntheticSource.CLASSES)
    log = read_log(out)
    seg = [r for r in log if "loss_ce" in r]
    assert [r["iter"] for r in seg] == [1, 2, 3, 4]
    for r in seg:
        for k in ("loss_ce", "loss_fm", "loss_st", "loss_D", "D_real", "D_fake", "st_selected"):
            assert math.isfinite(r[k]), (k, r)
    assert seg[0]["loss_st"] == 0 and seg[0]["st_selected"] == 0          # no self-training at iteration 0
    mlmt = [r for r in log if r.get("stage") == "mlmt"]
    assert [r["epoch"] for r in mlmt] == [1, 2] and mlmt[0]["cons_weight"] == 0 and mlmt[1]["cons_weight"] == 1
    assert all(math.isfinite(r[k]) for r in mlmt for k in ("loss_cls", "loss_cons", "teacher_map"))
    scores = s4.read_scores(os.path.join(out, "mlmt_val_scores.csv"), common.make_source("synthetic", **s4.SYNTHETIC_SIZE)
                            .splits["val"], common.SyntheticSource.CLASSES)
    assert len(scores) == 200 and all(((v >= 0) & (v <= 1)).all() for v in scores.values())


def test_s4_baseline_resume_and_same_seed(tmp_path):
    base = str(tmp_path / "base")
    s4.main(["--data", "synthetic", "--out", base, "--stage", "s4gan", "--lambda-fm", "0", "--lambda-st", "0"] + S4_TINY)
    rec = read_log(base)[0]
    assert "loss_D" not in rec and "loss_fm" not in rec and "loss_ce" in rec
    straight, parted, again = (str(tmp_path / k) for k in "abc")
    s4.main(["--data", "synthetic", "--out", straight, "--stage", "s4gan"] + S4_TINY)
    assert s4.main(["--data", "synthetic", "--out", parted, "--stage", "s4gan", "--stop-at", "2"] + S4_TINY) is None
    s4.main(["--data", "synthetic", "--resume", parted])
    s4.main(["--data", "synthetic", "--out", again, "--stage", "s4gan", "--stop-at", "2"] + S4_TINY)
    a, b, c = ([r for r in read_log(run) if "loss_ce" in r] for run in (straight, parted, again))
    assert [r["iter"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss_ce", "loss_fm", "loss_st", "loss_D"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra["iter"])
    assert a[1]["loss_D"] == c[1]["loss_D"] and a[0]["loss_ce"] == c[0]["loss_ce"]


def test_s4_mlmt_resume_and_fusion_from_another_run(tmp_path, monkeypatch):
    argv = ["--data", "synthetic", "--stage", "mlmt"] + S4_TINY
    straight, parted = str(tmp_path / "a"), str(tmp_path / "b")
    s4.main(argv + ["--out", straight])
    save = s4.save_atomic

    def save_then_stop(state, path):           # stop right after epoch 1's checkpoint
        save(state, path)
        if path.endswith("mlmt_last.pt") and state["epoch"] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(s4, "save_atomic", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        s4.main(argv + ["--out", parted])
    monkeypatch.setattr(s4, "save_atomic", save)
    s4.main(["--data", "synthetic", "--resume", parted])
    a, b = read_log(straight), read_log(parted)
    assert [r["epoch"] for r in b] == [1, 2]
    for k in ("loss_cls", "loss_cons", "teacher_map"):
        assert a[1][k] == pytest.approx(b[1][k], rel=1e-4, abs=1e-6), k
    assert (tmp_path / "a" / "mlmt_val_scores.csv").read_text() == (tmp_path / "b" / "mlmt_val_scores.csv").read_text()
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert "miou" not in m and 0 <= m["mlmt"]["teacher_map"] <= 1
    # an s4GAN run fused with the scores of the MLMT run above
    out = str(tmp_path / "fused")
    m = s4.main(["--data", "synthetic", "--stage", "s4gan", "--out", out, "--mlmt-scores",
                 os.path.join(straight, "mlmt_val_scores.csv"), "--eval-every", "2"] + S4_TINY)
    assert 0 <= m["fused"]["miou"] <= 1 and m["fused"]["scores"].endswith("mlmt_val_scores.csv")
    evals = [r for r in read_log(out) if "val_miou" in r]                # the released README's snapshot protocol
    assert [r["iter"] for r in evals] == [2, 4] and all(0 <= r["val_miou_fused"] <= 1 for r in evals)   # 4: final


def test_s4_discriminator_counts_shapes_and_dropout():
    for C, n in ((21, 2778561), (60, 2818497), (19, 2776513)):                     # card 4.3
        assert sum(p.numel() for p in s4.Discriminator(C).parameters()) == n
    D = s4.Discriminator(21)
    sizes = []
    hooks = [c.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for c in D.convs]
    z, feat = D(torch.rand(2, 24, 321, 321))
    assert z.shape == (2, 1) and feat.shape == (2, 512) and sizes == [160, 80, 40, 20]
    [h.remove() for h in hooks]
    assert [type(d) for d in D.drops] == [torch.nn.Dropout] * 4                     # Sec. 4.1.2: after all four
    Dq = s4.Discriminator(21, official_dropout=True)
    assert [type(d) for d in Dq.drops] == [torch.nn.Dropout2d] * 3 + [torch.nn.Identity]
    y = Dq.drops[0].train()(torch.ones(4, 64, 5, 5))                                # whole channels zeroed
    assert set(y.flatten(2).std(2).flatten().tolist()) == {0.0} and (y == 0).any() and (y == 2).any()
    D.eval()
    x = torch.rand(2, 24, 64, 64)
    z, feat = D(x)                                                                  # GAP feature feeds the fc
    assert torch.allclose(z, D.fc(feat)) and torch.allclose(D(x)[1], feat)


def test_s4_d_input_and_one_hot():
    img = torch.randn(3, 3, 8, 8) * 50 + 7
    y = torch.randint(0, 5, (3, 8, 8))
    y[0, 0, 0] = 255
    oh = s4.one_hot(y, 5)
    assert torch.equal(oh.sum(1)[y != 255], torch.ones(int((y != 255).sum()))) and oh[0, :, 0, 0].sum() == 0
    d = s4.d_input(oh, img)
    assert d.shape == (3, 8, 8, 8) and torch.equal(d[:, :5], oh)                     # class channels first
    im = d[:, 5:]
    assert im.min() == 0 and im.max() == 1 and torch.allclose(im, (img - img.min()) / (img.max() - img.min()))


def test_s4_losses_direct():
    g = torch.Generator().manual_seed(0)
    fr, ff = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    direct = sum(abs(fr[:, k].mean() - ff[:, k].mean()) for k in range(6)) / 6
    assert s4.loss_fm(fr, ff).item() == pytest.approx(float(direct), rel=1e-6)
    assert s4.loss_fm(fr, fr[torch.randperm(4)]).item() == pytest.approx(0, abs=1e-6)
    # Eq. (3): D scores 0.5, 0.61, 0.9 with gamma 0.6 select images 1 and 2 (card 10.8)
    pred = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    z = torch.logit(torch.tensor([[0.5], [0.61], [0.9]]))
    l_st, sel = s4.loss_st(pred, z, 0.6)
    assert sel.tolist() == [0, 1, 1]
    direct = F.cross_entropy(pred[1:], pred[1:].argmax(1))
    assert l_st.item() == pytest.approx(direct.item(), rel=1e-6)
    assert s4.loss_st(pred, z, 0.6, active=False)[0].item() == 0 and s4.loss_st(pred, z, 0.95)[0].item() == 0
    l_st.backward()
    assert pred.grad[0].abs().sum() == 0 and pred.grad[1:].abs().sum() > 0
    # Eq. (5) and the Table 6 GAN loss
    zr, zf = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
    direct = 0.5 * (-torch.log(torch.sigmoid(zr))).mean() + 0.5 * (-torch.log(1 - torch.sigmoid(zf))).mean()
    assert s4.loss_D(zr, zf).item() == pytest.approx(direct.item(), rel=1e-5)
    assert s4.bce(zf, 1).item() == pytest.approx((-torch.log(torch.sigmoid(zf))).mean().item(), rel=1e-5)
    assert s4.loss_S(1.0, 2.0, 3.0, 4.0, 0.1, 1.0, 0.5) == pytest.approx(1 + 0.2 + 3 + 2)
    # Eq. (6)
    s, t, zz = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.5).float()
    p = torch.sigmoid(s)
    assert s4.loss_cls(s, zz).item() == pytest.approx((-(zz * p.log() + (1 - zz) * (1 - p).log())).mean().item(), rel=1e-5)
    assert s4.loss_cons(s, t).item() == pytest.approx(((p - torch.sigmoid(t)) ** 2).mean().item(), rel=1e-5)
    assert s4.loss_cons(s, 3 * s, "cosine").item() == pytest.approx(0, abs=1e-6)
    assert s4.loss_cons(s, -s, "cosine").item() == pytest.approx(2, abs=1e-6)
    assert [s4.cons_weight(e, 10, 100) for e in (0, 10, 11, 60, 99)] == [0, 0, 0.02, 1, 1]   # card 10.12


def test_s4_fm_gradient_reaches_S_not_D():
    model = s4.DeepLabV2(4, "resnet18", (1, 2, 3, 4), width=8)
    D = s4.Discriminator(4, ndf=8)
    D.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    p = F.softmax(s4.up(model(x), (32, 32)), 1)
    _, feat_u = D(s4.d_input(p, x))
    _, feat_g = D(s4.d_input(s4.one_hot(torch.randint(0, 4, (2, 32, 32)), 4), x))
    s4.loss_fm(feat_g, feat_u).backward()
    assert all(p.grad is None for p in D.parameters())
    assert model.layer5.conv2d_list[0].weight.grad.abs().sum() > 0


def test_s4_ema_and_teacher():
    t, s = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.clone() for p in t.parameters()]
    s4.ema_update(t, s, 1, 0.999)                                                   # alpha = 1/2 at t = 1
    for a, b, c in zip(t.parameters(), t0, s.parameters()):
        assert torch.allclose(a, 0.5 * b + 0.5 * c)
    t1 = [p.clone() for p in t.parameters()]
    s4.ema_update(t, s, 10**6, 0.999)                                               # capped at the decay
    for a, b, c in zip(t.parameters(), t1, s.parameters()):
        assert torch.allclose(a, 0.999 * b + 0.001 * c)
    net = s4.make_classifier("resnet10", 6, "none")
    assert net.fc.out_features == 6 and net(torch.randn(2, 3, 48, 48)).shape == (2, 6)


def test_s4_fusion_hand_made():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 4, 6, 6, generator=g) * 3
    pred[:, 2] += 5                                                                 # class 2 would win everywhere
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.2], [0.1, 0.1, 0.1, 0.1]])
    fused = s4.fuse(pred, scores, 0.2).argmax(1)
    assert not (fused[0] == 2).any()                                                # below tau: never predicted
    keep = [0, 1]                                                                   # above tau: untouched
    assert torch.allclose(s4.fuse(pred, scores, 0.2)[0, keep], F.softmax(pred, 1)[0, keep])
    assert s4.fuse(pred, scores, 0.2)[0, 3].abs().sum() == 0                        # paper: dropped when <= tau
    assert torch.equal(s4.fuse(pred, scores, 0.2, official=True)[0, 3], pred[0, 3])   # code: kept when >= tau
    assert torch.equal(s4.fuse(pred, scores, 0.2)[1], torch.zeros(4, 6, 6))         # all dropped: nothing left
    # the released code's variant: a dropped class (logit 0) still wins where every kept logit is negative
    neg = -torch.ones(1, 3, 2, 2)
    assert (s4.fuse(neg, torch.tensor([[0.9, 0.1, 0.9]]), 0.2, official=True).argmax(1) == 1).all()
    assert not (s4.fuse(neg, torch.tensor([[0.9, 0.1, 0.9]]), 0.2).argmax(1) == 1).any()


def test_s4_class_vectors_and_mlmt_views():
    lab = np.array([[0, 0, 3], [255, 3, 5]], np.uint8)
    assert s4.class_vector(lab, 6).tolist() == [1, 0, 0, 1, 0, 1]
    src = common.make_source("synthetic", **s4.SYNTHETIC_SIZE)
    ids = src.splits["train"][:4]
    ds = s4.MLMTDataset(src, ids, 48, 6, seed=3)
    w1, st1, z1 = ds[2]
    w2, st2, z2 = ds[2]
    assert torch.equal(w1, w2) and torch.equal(st1, st2) and w1.shape == (3, 48, 48)   # seeded per item
    assert not torch.equal(w1, st1)                                                 # jitter and blur
    assert torch.equal(z1, torch.from_numpy(s4.class_vector(src.read_label(ids[2]), 6)))
    assert torch.equal(s4.MLMTDataset(src, ids, 48, 6, with_labels=False)[2][2], torch.zeros(6))
    ev = s4.MLMTDataset(src, ids, 48, 6, train=False)[2]
    assert torch.equal(ev[0], ev[1])


def test_s4_presets_quirks_and_normalizers():
    parse = lambda *a: s4.resolve_args(s4.get_parser().parse_args(list(a)))
    voc = parse("--data", "voc")
    assert (voc.num_steps, voc.batch_size, voc.gamma, voc.aspp_branches, voc.random_scale, voc.random_mirror,
            voc.cons, voc.init, voc.weight_decay, voc.nesterov) == (35000, 8, 0.6, 4, True, True, "mse",
                                                                  "imagenet", 5e-4, False)
    cs = parse("--data", "cityscapes")
    assert (cs.batch_size, cs.gamma, cs.lr_d, cs.stage, cs.crop_size) == (5, 0.7, 1e-5, "s4gan", (256, 512))
    assert parse("--data", "context").num_steps == 50000 and parse("--data", "context").label_pad == 255
    assert parse("--data", "context", "--official-context-aug").label_pad == 0     # issue 13.8: only with its aug
    assert parse("--data", "voc", "--official-quirks").label_pad == 255
    q = parse("--data", "voc", "--official-quirks")
    assert (q.aspp_branches, q.official_optimizer, q.cons, q.fuse_logits, q.num_steps, q.random_scale,
            q.random_mirror, q.official_dropout) == (2, True, "cosine", True, 40000, False, False, True)
    assert parse("--data", "cityscapes", "--official-quirks").batch_size == 8
    assert parse("--data", "synthetic", "--official-quirks").num_steps == 1000
    assert parse("--data", "voc", "--official-quirks", "--aspp-branches", "4").aspp_branches == 4
    img = np.full((2, 2, 3), (10, 20, 30), np.uint8)
    tr, ev = s4.normalizers(q)
    assert np.allclose(tr(img)[0, 0], np.float32((10, 20, 30)) - np.float32(common.Normalize.CAFFE_MEAN_BGR[::-1]))
    for data in ("cityscapes", "synthetic-cityscapes"):                    # the generated data takes the same path
        tr, ev = s4.normalizers(parse("--data", data, "--official-quirks"))
        assert np.allclose(tr(img)[0, 0], (np.float32((30, 20, 10)) - np.float32((73.158, 82.909, 72.392))) / 255,
                           atol=1e-6)
    tr, ev = s4.normalizers(parse("--data", "context", "--official-quirks"))
    assert np.allclose(tr(img)[0, 0, 0], (10 / 255 - 0.406) / 0.229) and ev.mode == "imagenet"
    assert all(n.mode == "imagenet" for n in s4.normalizers(voc))


def make_context(root, n_train=4, n_val=2, with_255=False):
    base = root / "VOC2010"
    for d in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"2008_{k:06d}" for k in range(n_train + n_val)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{i}.jpg")
        lab = rng.integers(0, 60, (30, 40)).astype(np.uint8)
        lab[0, 0] = 255 if with_255 else 59
        Image.fromarray(lab).save(base / "SegmentationClassContext" / f"{i}.png")
    (base / "ImageSets/SegmentationContext/train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (base / "ImageSets/SegmentationContext/val.txt").write_text("\n".join(ids[n_train:]) + "\n")


def test_s4_pascal_context_layout_transforms_and_run(tmp_path, capsys):
    make_context(tmp_path / "ctx")
    src = common.make_source("context", str(tmp_path / "ctx"))
    assert len(src.CLASSES) == 60 and len(src.splits["train"]) == 4 and src.CLASSES[0] == "background"
    img, lab = src.read(src.splits["val"][0])
    assert lab.max() <= 59 and img.shape == (30, 40, 3)
    # training padding is background (0), evaluation: short side to 512, central square
    tf = common.TrainTransform(common.Normalize(), crop=(50, 50), label_pad=0)
    _, y, _ = tf(img, lab, random.Random(0))
    assert (y[30:] == 0).all() and (y[:, 40:] == 0).all()
    x, y, _ = common.EvalTransform(common.Normalize(), short_side=64)(img, lab)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    x, _, _ = common.TrainTransform(common.Normalize(), crop=(32, 32), short_side=(40, 41), blur=1.0)(img, lab,
                                                                                                    random.Random(0))
    assert x.shape == (3, 32, 32)
    out = str(tmp_path / "run")
    m = s4.main(["--data", "context", "--data-root", str(tmp_path / "ctx"), "--backbone", "resnet18", "--width", "8",
                 "--init", "none", "--crop-size", "33", "33", "--labeled", "0.5", "--eval-short-side", "40",
                 "--mlmt-backbone", "resnet10", "--mlmt-init", "none", "--out", out] + S4_TINY)
    assert len(m["iou"]) == 60 and 0 <= m["fused"]["miou"] <= 1
    make_context(tmp_path / "bad", with_255=True)
    with pytest.raises(SystemExit):
        s4.main(["--data", "context", "--data-root", str(tmp_path / "bad"), "--init", "none", "--backbone", "resnet18",
                 "--width", "8", "--out", str(tmp_path / "x")] + S4_TINY)
    assert "59-class" in capsys.readouterr().err


def test_s4_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "scores.csv"
    bad.write_text("id,a,b\nsyn01000,0.1,0.2\n")
    for argv, msg in [(["--data", "synthetic", "--gamma", "1.5"], "--gamma"),
                      (["--data", "synthetic", "--mlmt-scores", "missing.csv"], "missing.csv"),
                      (["--data", "synthetic", "--stage", "mlmt", "--mlmt-scores", str(bad)], "--stage mlmt"),
                      (["--data", "synthetic", "--mlmt-scores", str(bad)], "not an MLMT score file"),
                      (["--data", "context", "--data-root", str(tmp_path)], "SegmentationClassContext"),
                      (["--data", "context", "--data-root", str(tmp_path), "--download"], "not downloaded"),
                      (["--data", "synthetic", "--labeled", "0"], "(0, 1]"),
                      (["--data", "synthetic", "--resume", str(tmp_path)], "nothing to resume")]:
        with pytest.raises(SystemExit) as e:
            s4.main(argv + ["--out", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "x").exists()


def test_s4_train_freezes_D_for_S_and_detaches_fakes(tmp_path, monkeypatch):
    """Card 10.7 / 10.9 inside train(): D is frozen while S's losses use it, its fakes are detached for L_D, and
    both optimizer steps come after both backward passes."""
    calls, steps = [], []
    forward = s4.Discriminator.forward

    def spy(self, x):
        calls.append((next(self.parameters()).requires_grad, x.requires_grad, torch.is_grad_enabled()))
        return forward(self, x)
    monkeypatch.setattr(s4.Discriminator, "forward", spy)
    for cls in (torch.optim.Adam,):
        step = cls.step
        monkeypatch.setattr(cls, "step", lambda self, *a, _s=step, **k: (steps.append(len(calls)), _s(self, *a, **k))[1])
    s4.main(["--data", "synthetic", "--stage", "s4gan", "--out", str(tmp_path / "r"), "--num-pictures", "0"] +
            S4_TINY[:4] + ["--num-steps", "1"])
    # fake for L_fm/L_st (D frozen, gradient to S), real for L_fm (no graph), then L_D's fake (detached) and real
    assert calls == [(False, True, True), (False, False, False), (True, False, True), (True, False, True)]
    assert steps == [4, 4]                                                          # opt_S and opt_D, after all four


def test_s4_segmenter_copy_and_schedule():
    model = s4.DeepLabV2(21, "resnet18", width=8)
    assert model(torch.randn(1, 3, 321, 321)).shape == (1, 21, 41, 41)             # card 10.1 (ceil-mode pool)
    assert model(torch.randn(1, 3, 256, 512)).shape == (1, 21, 33, 65)
    head = s4.ASPP(8, 3, (1, 2, 3, 4), branches=2)
    x = torch.randn(1, 8, 9, 9)
    assert torch.allclose(head(x), head.conv2d_list[0](x) + head.conv2d_list[1](x))  # released code's bug
    head.branches = 4
    assert torch.allclose(head(x), sum(c(x) for c in head.conv2d_list))
    args = s4.resolve_args(s4.get_parser().parse_args(["--data", "voc"]))
    D = s4.Discriminator(21, 8)
    opt_S, opt_D = s4.make_optimizers(model, D, args)
    s4.poly_lr(opt_S, opt_D, 0, args)                                               # card 10.11
    assert [g["lr"] for g in opt_S.param_groups] == [2.5e-4, 2.5e-3] and opt_D.param_groups[0]["lr"] == 1e-4
    s4.poly_lr(opt_S, opt_D, 17500, args)
    assert opt_S.param_groups[0]["lr"] == pytest.approx(2.5e-4 * 0.5 ** 0.9)
    ids = [id(p) for g in opt_S.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    assert opt_S.param_groups[0]["weight_decay"] == 5e-4 and not opt_S.param_groups[0]["nesterov"]


@pytest.mark.parametrize("cons,expected", [("mse", {16 + 8, 125 % 16 + 8}), ("cosine", {8})])
def test_s4_consistency_sees_labeled_and_unlabeled_images(tmp_path, monkeypatch, cons, expected):
    """Eq. (6): the paper's MSE runs on labeled and unlabeled images; the released code's cosine on unlabeled only."""
    sizes = []
    loss = s4.loss_cons
    monkeypatch.setattr(s4, "loss_cons", lambda s, t, kind="mse": (sizes.append((s.shape[0], t.shape[0], kind)),
                                                                    loss(s, t, kind))[1])
    s4.main(["--data", "synthetic", "--stage", "mlmt", "--cons", cons, "--out", str(tmp_path / "r")] + S4_TINY[4:] +
            ["--mlmt-epochs", "1"])
    assert len(sizes) == 8 and all(s == t and s in expected and kind == cons for s, t, kind in sizes)   # 125 / 16


# ---------------------------------------------------------------------------------------------------------------
# dual_disc.py (two discriminators: D1 image-level threshold, D2 pixel-level against C_map)
# ---------------------------------------------------------------------------------------------------------------
import dual_disc as dd  # noqa: E402

DD_TINY = ["--num-steps", "4", "--semi-start", "2", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
           "--num-pictures", "2"]


def test_dd_end_to_end_synthetic_with_calibration(tmp_path):
    out = str(tmp_path / "run")
    m = dd.main(["--data", "synthetic", "--out", out] + DD_TINY)
    for name in ("args.json", "labeled.txt", "log.jsonl", "last.pt", "metrics.json", "predictions.png",
                 "calibration.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert 0 <= m["miou"] <= 1 and set(m["iou"]) == set(common.SyntheticSource.CLASSES)
    log = [r for r in read_log(out) if "val_miou" not in r]   # training lines (the final val mIoU follows)
    assert [r["iter"] for r in log] == [1, 2, 3, 4]
    for r in log[:2]:                                     # phase A: G, D1, D2 (and the comparison D) trained
        for k in ("loss_ce", "loss_adv", "loss_adv_d1", "loss_adv_d2", "loss_D1", "loss_D2", "loss_D_hung",
                  "D1_real", "D1_fake", "D2_conf", "C_map"):
            assert math.isfinite(r[k]), (k, r)
        assert "loss_semi" not in r
    for r in log[2:]:                                     # phase B: D1, D2 fixed, L_s on the trusted region
        assert "loss_D1" not in r and "loss_D2" not in r and math.isfinite(r["loss_semi"])
        assert 0 <= r["threshold"] <= 1 and 0 <= r["trusted"] <= 1
    cal = m["calibration"]
    for k in ("d2", "hung", "softmax"):
        c = cal[k]
        assert 0 <= c["ece"] <= 1 and 0 <= c["auroc"] <= 1
        assert sum(c["share_of_correct"]) == pytest.approx(1, abs=1e-3)
        assert sum(c["share_of_incorrect"]) == pytest.approx(1, abs=1e-3)
    t = cal["trusted_region"]
    assert t["threshold_mode"] == "one_minus_d1" and 0 <= t["fraction_of_pixels"] <= 1
    assert t["accuracy_all"] == pytest.approx(m["pixel_acc"], abs=1e-6)
    with Image.open(os.path.join(out, "calibration.png")) as im:
        assert im.size[0] > 600


@pytest.mark.parametrize("ablation,keys,semi", [("baseline", set(), False), ("d2", {"d2", "hung"}, False),
                                                ("d1d2", {"d1", "d2", "hung"}, False),
                                                ("static", {"d2", "hung"}, True)])
def test_dd_table3_ablations(tmp_path, ablation, keys, semi):
    args = dd.resolve_args(dd.get_parser().parse_args(["--data", "voc", "--ablation", ablation]))
    assert set(dd.build_discriminators(21, args).keys()) == keys
    assert (args.lambda_semi == 0.1) == semi and (args.threshold_mode == "static") == (ablation == "static")
    if ablation in ("baseline", "static"):                # the two ends of Table 3 also run end to end
        out = str(tmp_path / ablation)
        m = dd.main(["--data", "synthetic", "--out", out, "--ablation", ablation] + DD_TINY)
        log = [r for r in read_log(out) if "val_miou" not in r]
        if ablation == "baseline":                       # no discriminator: only G's own softmax is calibrated
            assert "loss_adv" not in log[0] and "loss_D2" not in log[0] and "loss_semi" not in log[-1]
            assert set(m["calibration"]) == {"softmax"}
            assert not os.path.exists(os.path.join(out, "calibration.png"))
        else:
            assert "loss_D1" not in log[0] and "loss_D2" in log[0] and "threshold" not in log[-1]
            assert "loss_semi" in log[-1] and m["calibration"]["trusted_region"]["threshold_mode"] == "static"


def test_dd_c_map_and_loss_D2_hand_made():
    """Card 15.1: C_map is 1 exactly where argmax matches the ground truth, and 255 pixels do not count."""
    pred = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]]]])       # (1, 2, 2, 2): argmax 0 1 / 1 0
    label = torch.tensor([[[0, 0], [1, 255]]])
    cmap, valid = dd.c_map(pred, label)
    assert cmap.tolist() == [[[1.0, 0.0], [1.0, 0.0]]] and valid.tolist() == [[[True, True], [True, False]]]
    z2 = torch.tensor([[[[0.5, -1.0], [2.0, 7.0]]]])
    s = torch.sigmoid(z2[0, 0])
    direct = -(math.log(s[0, 0]) + math.log(1 - s[0, 1]) + math.log(s[1, 0])) / 3           # void pixel left out
    assert dd.loss_D2(z2, cmap, valid).item() == pytest.approx(direct, rel=1e-6)
    hung_target = -(math.log(1 - s[0, 0]) + math.log(1 - s[0, 1]) + math.log(1 - s[1, 0])) / 3
    assert abs(dd.loss_D2(z2, torch.zeros_like(cmap), valid).item() - hung_target) < 1e-6   # all-zero target
    assert dd.loss_D2(z2, cmap, valid).item() != pytest.approx(hung_target)                  # differs when some are right
    # L_D1 and the generator's L_ad against direct formulas
    z_real, z_fake = torch.tensor([0.3, -0.2]), torch.tensor([1.0, -2.0])
    ls = F.logsigmoid
    assert dd.loss_D1(z_real, z_fake).item() == pytest.approx(
        -(ls(z_real).mean() + ls(-z_fake).mean()).item(), rel=1e-6)
    l_ad, l1, l2 = dd.loss_adv(z_fake, z2, valid)
    assert l1.item() == pytest.approx(-ls(z_fake).mean().item(), rel=1e-6)
    assert l2.item() == pytest.approx(-(ls(z2[0, 0])[valid[0]]).mean().item(), rel=1e-6)
    assert l_ad.item() == pytest.approx(l1.item() + l2.item())
    assert dd.loss_G(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), 0.01, 0.1).item() == pytest.approx(1.32)


def test_dd_trusted_region_and_L_s_hand_made():
    """Card 15.3-15.4: per-image dynamic thresholds sigmoid(D1), the static 0.9, 1 - D1; L_s by hand; 0 if empty."""
    conf = torch.tensor([[[0.2, 0.4], [0.6, 0.95]], [[0.2, 0.4], [0.6, 0.95]]])            # sigmoid(D2), 2 images
    z2 = torch.logit(conf)[:, None].requires_grad_()
    z1 = torch.logit(torch.tensor([0.3, 0.7])).requires_grad_()                             # D1: 0.3 and 0.7
    t = dd.threshold(z1, "d1", 0.9)
    assert t.shape == (2, 1, 1) and t.flatten().tolist() == pytest.approx([0.3, 0.7]) and not t.requires_grad
    pred_u = _logits(2, 3, 2, 2).float().requires_grad_()
    l_s, trusted = dd.loss_semi(pred_u, z2, t)
    assert trusted.tolist() == [[[False, True], [True, True]], [[False, False], [False, True]]]   # per image
    logp = F.log_softmax(pred_u.detach(), 1)
    arg = pred_u.detach().argmax(1)
    picked = [-logp[n, arg[n, h, w], h, w] for n, h, w in zip(*torch.nonzero(trusted, as_tuple=True))]
    assert l_s.item() == pytest.approx(torch.stack(picked).mean().item(), rel=1e-5)
    l_s.backward()
    assert pred_u.grad is not None and z1.grad is None and z2.grad is None               # only log G(X_u) has a graph
    assert dd.loss_semi(pred_u, z2, 0.9)[1].sum() == 2                                      # static: 0.95 > 0.9 only
    assert dd.threshold(z1, "static", 0.9) == 0.9
    assert dd.threshold(z1, "one_minus_d1", 0.9).flatten().tolist() == pytest.approx([0.7, 0.3])
    empty, kept = dd.loss_semi(pred_u, z2, 0.99)
    assert kept.sum() == 0 and empty.item() == 0                                            # no trusted pixel: 0, not NaN


@pytest.mark.parametrize("structure", ["s1", "s2", "s3", "s4"])
def test_dd_d2_output_shape_per_structure(structure):
    """Table 7: every structure returns one logit per pixel at the input size; s4 decodes at OS 4 from OS 16."""
    D2 = dd.PixelDiscriminator(21, ndf=8, structure=structure)
    seen = {}
    if structure == "s4":
        D2.e4.register_forward_hook(lambda m, i, o: seen.__setitem__("e4", o.shape[-2:]))
        D2.decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("dec", o.shape[-2:]))
    if structure == "s2":
        D2.e4.register_forward_hook(lambda m, i, o: seen.__setitem__("e4", o.shape[-2:]))
    for size in ((321, 321), (80, 80), (64, 128)):
        assert D2(torch.rand(2, 21, *size)).shape == (2, 1, *size)
        if structure == "s4" and size == (321, 321):
            assert tuple(seen["e4"]) == (20, 20) and tuple(seen["dec"]) == (80, 80)          # card 15.5
        if structure == "s2" and size == (321, 321):
            assert tuple(seen["e4"]) == (80, 80)                                             # features stay at OS 4


@pytest.mark.parametrize("head", ["gap", "fc"])
def test_dd_d1_one_value_per_image(head):
    D1 = dd.ImageDiscriminator(21, ndf=8, head=head)
    for size in ((321, 321), (80, 80), (128, 256)):
        z = D1(torch.rand(3, 21, *size))
        assert z.shape == (3,)
    x = torch.rand(2, 21, 80, 80)
    assert torch.allclose(D1(x)[1], D1(x[1:])[0], atol=1e-6)                                # no mixing across images


def test_dd_d2_input_designs_and_hung_d():
    """Table 6: channel counts; the label-map design carries no gradient to G (card 5)."""
    prob = F.softmax(_logits(2, 4, 6, 6).float(), 1).requires_grad_()
    img = torch.randn(2, 3, 6, 6)
    sizes = {k: dd.d2_input(prob, img, k).shape[1] for k in ("prob", "prob_rgb", "label_rgb", "prob_x_rgb")}
    assert sizes == {"prob": 4, "prob_rgb": 7, "label_rgb": 7, "prob_x_rgb": 12}
    assert not dd.d2_input(prob, img, "label_rgb")[:, :4].requires_grad
    prod = dd.d2_input(prob, img, "prob_x_rgb")
    assert torch.allclose(prod[:, 3 * 2 + 1], prob[:, 2] * img[:, 1])                     # class 2 times green
    args = dd.resolve_args(dd.get_parser().parse_args(["--data", "voc", "--d2-input", "prob_x_rgb", "--ndf", "8"]))
    D = dd.build_discriminators(21, args)
    assert D["d2"].e1[0].in_channels == 63 and D["d1"].trunk[0][0].in_channels == 21
    assert D["hung"](torch.rand(1, 21, 321, 321)).shape == (1, 1, 321, 321)


def test_dd_generator_shapes_and_torchvision_weights(tmp_path, capsys):
    """DeepLab-v3+ from torchvision parts: 321 -> logits at stride 4 (81x81); ImageNet weights load by name."""
    import torchvision
    model = dd.DeepLabV3Plus(21)
    x = torch.randn(2, 3, 321, 321)
    model.eval()
    assert model(x).shape == (2, 21, 81, 81)
    assert [c[0].dilation for c in model.aspp.convs[1:4]] == [(6, 6), (12, 12), (18, 18)]
    assert model.backbone.layer4[0].conv2.stride == (1, 1) and model.aspp.project[3].p == 0.1
    assert not any(p.requires_grad for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
                   for p in m.parameters())
    assert dd.DeepLabV3Plus(21, output_stride=8).aspp.convs[1][0].dilation == (12, 12)     # card 3
    ref = torchvision.models.resnet101()
    path = str(tmp_path / "r101.pth")
    torch.save(ref.state_dict(), path)
    args = dd.resolve_args(dd.get_parser().parse_args(["--data", "voc", "--restore-from", path]))
    dd.initialise(model, args)
    assert torch.equal(model.backbone.layer3[7].conv2.weight, ref.layer3[7].conv2.weight)
    assert "loaded" in capsys.readouterr().out
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(common.DataError):
        dd.initialise(model, args)


def test_dd_optimizers_and_schedule():
    """Card 15.7: SGD (momentum 0.9, wd 1e-4, lr 1e-3, head 1e-2), Adam 1e-4 (0.9, 0.99) for D1 and D2, poly 0.9."""
    args = dd.resolve_args(dd.get_parser().parse_args(["--data", "voc", "--ndf", "8"]))
    assert (args.lambda_adv, args.lambda_semi, args.semi_start, args.num_steps, args.batch_size) == \
           (0.01, 0.1, 5000, 20000, 10)
    model = dd.DeepLabV3Plus(21, "resnet14", 16, aspp_channels=16, decoder_channels=16)
    D = dd.build_discriminators(21, args)
    opt_S, opt_D = dd.make_optimizers(model, D, args)
    dd.poly_lr(opt_S, opt_D, 0, args)
    assert [g["lr"] for g in opt_S.param_groups] == [1e-3, 1e-2]
    g = opt_S.param_groups[0]
    assert isinstance(opt_S, torch.optim.SGD) and g["momentum"] == 0.9 and g["weight_decay"] == 1e-4
    assert isinstance(opt_D, torch.optim.Adam) and opt_D.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt_D.param_groups[0]["lr"] == 1e-4
    dd.poly_lr(opt_S, opt_D, 10000, args)
    assert opt_S.param_groups[1]["lr"] == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert opt_D.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5 ** 0.9)
    ids = [id(p) for g in opt_S.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    assert {id(p) for p in opt_D.param_groups[0]["params"]} == {id(p) for p in D.parameters()}
    cs = dd.resolve_args(dd.get_parser().parse_args(["--data", "cityscapes"]))
    assert (cs.num_steps, cs.batch_size, cs.resize, cs.crop_size) == (40000, 2, (512, 1024), None)


def test_dd_phases_unlabeled_and_discriminator_updates(tmp_path, monkeypatch):
    """Card 15.6 and 15.2 inside train(): phase A never draws an unlabeled batch and steps the D optimizer; phase B
    steps no D optimizer (D1, D2 unchanged) and uses both labeled and unlabeled losses. D is frozen while G uses it."""
    drawn, d_calls = [], []
    nxt = common.InfiniteLoader.__next__

    def spy_next(self):
        drawn.append(self.dataset.seed)
        return nxt(self)
    monkeypatch.setattr(common.InfiniteLoader, "__next__", spy_next)
    fwd = dd.PixelDiscriminator.forward
    monkeypatch.setattr(dd.PixelDiscriminator, "forward",
                        lambda self, x: (torch.is_grad_enabled() and d_calls.append(
                            (next(self.parameters()).requires_grad, x.requires_grad)), fwd(self, x))[1])
    snapshots = []
    save = dd.save_checkpoint
    monkeypatch.setattr(dd, "save_checkpoint", lambda run_dir, it, model, D, *a: (
        snapshots.append((it, {k: v.clone() for k, v in D.state_dict().items()})), save(run_dir, it, model, D, *a)))
    out = str(tmp_path / "r")
    dd.main(["--data", "synthetic", "--out", out, "--num-pictures", "0"] + DD_TINY[:8] + ["--save-every", "1"])
    log = read_log(out)
    labeled_seed, unlabeled_seed = 0, 1                     # SegDataset seeds: args.seed and args.seed + 1
    assert drawn[:4].count(unlabeled_seed) == 0            # iterations 0-1: labeled + ground truth only
    assert drawn[4:].count(unlabeled_seed) == 2 and drawn[4:].count(labeled_seed) == 2 and 2 not in drawn[4:]
    d_at = {it: d for it, d in snapshots}
    assert not torch.equal(d_at[1]["d2.e1.0.weight"], d_at[2]["d2.e1.0.weight"])  # trained in phase A ...
    assert not torch.equal(d_at[1]["d1.classifier.weight"], d_at[2]["d1.classifier.weight"])
    assert all(torch.equal(d_at[2][k], d_at[4][k]) for k in d_at[2])          # ... and fixed after the warm-up
    assert os.path.isfile(os.path.join(out, "calibration_warmup.png"))        # card 15.8: measured at that point
    assert "loss_D2" in log[1] and "loss_D2" not in log[2] and "loss_semi" in log[2] and "loss_ce" in log[3]
    # phase A: G's L_ad through a frozen D2 (graph to G), then D2's own step on detached maps; phase B: the trusted
    # region is read from a frozen D2 on the unlabeled map, whose graph serves L_ad on unlabeled images (Hung's 0.001),
    # and L_ad on the labeled batch still flows through it
    assert d_calls[:2] == [(False, True), (True, False)]
    assert d_calls[4:6] == [(False, True), (False, True)]


def test_dd_last_batch_of_one_is_dropped(tmp_path):
    """9 labeled images in batches of 4 leave one image: the image-pooling BatchNorm cannot take it, so the loader
    drops it (min_batch=2) instead of crashing at the next pass (VOC 1/2 and every Cityscapes split would)."""
    out = str(tmp_path / "r")
    m = dd.main(["--data", "synthetic", "--out", out, "--labeled", "0.009", "--num-pictures", "0"] + DD_TINY[:8])
    assert m["labeled"] == 9 and len([r for r in read_log(out) if "val_miou" not in r]) == 4
    source = common.make_source("synthetic", **dd.SYNTHETIC_SIZE)
    ds = common.SegDataset(source, source.splits["train"][:9], common.LabelTransform(), labels_only=True)
    it = common.InfiniteLoader(ds, 4, 0, min_batch=2)
    sizes = [next(it).shape[0] for _ in range(5)]
    assert sizes == [4, 4, 4, 4, 4]                                            # 4 + 4, the ninth dropped, next pass
    it = common.InfiniteLoader(ds, 4, 0)
    assert [next(it).shape[0] for _ in range(3)] == [4, 4, 1]                   # the other scripts keep it


def test_dd_no_freeze_keeps_training_discriminators(tmp_path):
    out = str(tmp_path / "r")
    dd.main(["--data", "synthetic", "--out", out, "--no-freeze-d-after-warmup", "--num-pictures", "0"] + DD_TINY[:8])
    log = [r for r in read_log(out) if "val_miou" not in r]
    assert all("loss_D2" in r and "loss_D1" in r for r in log) and "loss_semi" in log[-1]


def test_dd_resume_gives_the_same_losses(tmp_path):
    straight, parted, again = (str(tmp_path / k) for k in "abc")
    dd.main(["--data", "synthetic", "--out", straight, "--num-pictures", "0"] + DD_TINY[:-2])
    assert dd.main(["--data", "synthetic", "--out", parted, "--stop-at", "2"] + DD_TINY) is None
    dd.main(["--data", "synthetic", "--resume", parted])
    dd.main(["--data", "synthetic", "--out", again, "--stop-at", "2"] + DD_TINY)
    a, b, c = ([r for r in read_log(d) if "val_miou" not in r] for d in (straight, parted, again))
    assert [r["iter"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss_ce", "loss_adv", "loss_D1", "loss_D2", "loss_semi", "trusted", "threshold"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra["iter"])
    assert a[1]["loss_D2"] == c[1]["loss_D2"] and a[0]["loss_ce"] == c[0]["loss_ce"]


def test_dd_calibration_hand_made():
    cal = dd.Calibration("cpu")
    conf = torch.tensor([0.05, 0.15, 0.85, 0.95, 0.95, 0.55])
    correct = torch.tensor([False, False, True, True, True, False])
    cal.update(conf, correct, torch.ones(6, dtype=torch.bool))
    c = cal.compute()
    assert c["auroc"] == 1.0                                                  # every correct pixel above every wrong
    assert c["share_of_correct"][8:] == pytest.approx([1 / 3, 2 / 3], abs=1e-5) and sum(c["share_of_correct"][:8]) == 0
    assert [c["share_of_incorrect"][k] for k in (0, 1, 5)] == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert c["accuracy_per_bin"][9] == 1.0 and c["accuracy_per_bin"][5] == 0.0 and c["accuracy_per_bin"][3] is None
    ece = (0.05 + 0.15 + 0.15 + 2 * 0.05 + 0.55) / 6                        # sum over bins of n_b/N |acc_b - conf_b|
    assert c["ece"] == pytest.approx(ece, rel=1e-6)
    assert c["mean_conf_correct"] == pytest.approx(0.25 * 0 + (0.85 + 0.95 + 0.95) / 3)
    cal2 = dd.Calibration("cpu")
    cal2.update(torch.tensor([0.3, 0.3]), torch.tensor([True, False]), torch.tensor([True, True]))
    assert cal2.compute()["auroc"] == 0.5                                     # a tie counts one half


def test_dd_bad_inputs(tmp_path, capsys):
    def run(argv, *fragments):
        _dd_expect(capsys, argv, *fragments)
    run(["--data", "synthetic", "--ablation", "baseline", "--lambda-semi", "0.1"], "no D2")
    run(["--data", "synthetic", "--ablation", "static", "--threshold-mode", "d1"], "needs D1")
    run(["--data", "synthetic", "--t-static", "1.5"], "--t-static")
    run(["--data", "synthetic", "--batch-size", "1"], "at least 2")
    run(["--data", "synthetic", "--semi-start", "0"], "untrained")
    run(["--data", "synthetic", "--labeled", "0.001"], "cannot fill a batch")
    run(["--data", "synthetic", "--ablation", "baseline", "--lambda-adv-unl", "0.001"], "needs a discriminator")
    run(["--data", "synthetic", "--init", "imagenet"], "use --init none")
    run(["--data", "synthetic", "--ablation", "everything"], "invalid choice")
    run(["--data", "synthetic", "--d2-structure", "s5"], "invalid choice")
    run(["--data", "voc", "--data-root", str(tmp_path / "nowhere")], "does not exist")
    run(["--data", "synthetic", "--resume", str(tmp_path)], "nothing to resume")
    assert not os.listdir(tmp_path)


def _dd_expect(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        dd.main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for f in fragments:
        assert f in err[0], (f, err[0])


# ===============================================================================================================
# Helper H2 (issues 13.4, 13.8-13.11, 14.6, 14.7): cv2 resampling, s4gan_mlmt fidelity fixes
# ===============================================================================================================
def _cv2_linear_by_hand(img, h, w, fy, fx):
    """OpenCV's INTER_LINEAR for uint8, written out pixel by pixel: source coordinate (d + 0.5) / f - 0.5 (stored as
    float32, as OpenCV does), replicated border, weights on a 2048 scale summing to 2048, horizontal then vertical
    pass, (v + 2^21) >> 22."""
    def taps(d, f, n):
        c = float(np.float32((d + 0.5) * (1.0 / f) - 0.5))
        i = math.floor(c)
        t = float(np.float32(c - i))
        if i < 0:
            i, t = 0, 0.0
        if i >= n - 1:
            i, t = n - 1, 0.0
        w1 = int(round(t * 2048))
        return i, min(i + 1, n - 1), 2048 - w1, w1
    out = np.zeros((h, w, img.shape[2]), np.uint8)
    for y in range(h):
        y0, y1, b0, b1 = taps(y, fy, img.shape[0])
        for x in range(w):
            x0, x1, a0, a1 = taps(x, fx, img.shape[1])
            for k in range(img.shape[2]):
                r0 = int(img[y0, x0, k]) * a0 + int(img[y0, x1, k]) * a1
                r1 = int(img[y1, x0, k]) * a0 + int(img[y1, x1, k]) * a1
                out[y, x, k] = min(255, (r0 * b0 + r1 * b1 + (1 << 21)) >> 22)
    return out


def test_h2_cv2_resize_matches_the_formula_by_hand():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    lab = rng.integers(0, 21, (13, 17), dtype=np.uint8)
    for f in (0.5, 0.6, 0.7, 1.3, 1.6):            # cv2.resize(src, None, fx=f, fy=f): size rounded half to even
        h, w = round(13 * f), round(17 * f)
        assert np.array_equal(common.resize_cv2_linear(img, (h, w), (f, f)), _cv2_linear_by_hand(img, h, w, f, f))
        ys = [min(math.floor(d * (1.0 / f)), 12) for d in range(h)]                 # INTER_NEAREST: floor(d / f)
        xs = [min(math.floor(d * (1.0 / f)), 16) for d in range(w)]
        assert np.array_equal(common.resize_cv2_nearest(lab, (h, w), (f, f)), lab[np.ix_(ys, xs)])
    for h, w in ((6, 8), (9, 30)):                 # cv2.resize(src, (w, h)): scale src/dst per axis
        img_r, lab_r = common.resize_pair(img, lab, (h, w), "cv2")
        assert np.array_equal(img_r, _cv2_linear_by_hand(img, h, w, h / 13, w / 17))
        assert np.array_equal(lab_r, lab[np.ix_([min(math.floor(d * (13 / h)), 12) for d in range(h)],
                                                 [min(math.floor(d * (17 / w)), 16) for d in range(w)])])
    grey = img[..., 0]                             # a single-channel image takes the same path
    assert np.array_equal(common.resize_cv2_linear(grey, (9, 12), (0.7, 0.7)),
                          _cv2_linear_by_hand(grey[..., None], 9, 12, 0.7, 0.7)[..., 0])
    # TrainTransform: the released loaders' sizes (25 * 0.5 = 12.5 -> 12, half to even) and labels
    tf = common.TrainTransform(lambda a: a.astype(np.float32), scales=[0.5])
    big = rng.integers(0, 21, (25, 31), dtype=np.uint8)
    _, y, _ = tf(rng.integers(0, 256, (25, 31, 3), dtype=np.uint8), big, random.Random(0))
    assert tuple(y.shape) == (12, 16) and np.array_equal(y.numpy(), big[::2, ::2][:12, :16])
    _, y, _ = common.TrainTransform(lambda a: a.astype(np.float32), scales=[0.5], resample="pil")(
        rng.integers(0, 256, (25, 31, 3), dtype=np.uint8), big, random.Random(0))
    assert tuple(y.shape) == (13, 16)
    with pytest.raises(common.DataError):
        common.resize_pair(img, lab, (5, 5), "bicubic")


def test_h2_cv2_shrink_keeps_pixel_noise_pil_smooths_it():
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    cv, _ = common.resize_pair(noise, None, (100, 100), "cv2", factor=(0.5, 0.5))
    pil, _ = common.resize_pair(noise, None, (100, 100), "pil")
    assert noise.std() / 2 * 0.95 < cv.std() < noise.std() / 2 * 1.05    # a 2x2 mean: std halves (36.8 of 73.6)
    assert pil.std() < 0.7 * cv.std()                                      # PIL's wider filter (measured 23 vs 37)


def test_h2_s4_resampling_and_context_padding_defaults():
    parse = lambda *a: s4.resolve_args(s4.get_parser().parse_args(list(a)))
    assert parse("--data", "voc").resample == "cv2"                      # released VOC loader: cv2.resize
    assert parse("--data", "context").resample == "pil" and parse("--data", "cityscapes").resample == "pil"
    assert parse("--data", "voc", "--resample", "pil").resample == "pil"
    assert common.TrainTransform(None).resample == "cv2" and common.EvalTransform(None).resample == "cv2"
    ctx = parse("--data", "context")
    assert ctx.label_pad == 255 and parse("--data", "context", "--official-quirks").label_pad == 0
    img, lab = np.zeros((30, 40, 3), np.uint8), np.ones((30, 40), np.uint8)
    _, y, _ = common.TrainTransform(lambda a: a.astype(np.float32), crop=(50, 50), label_pad=ctx.label_pad)(
        img, lab, random.Random(0))
    assert (y[30:] == 255).all() and (y[:30, :40] == 1).all()            # padding ignored, not background


@pytest.mark.parametrize("script", ["s4gan_mlmt", "hung2018", "latent_classes"])
def test_h2_s4_aspp_biases_keep_pytorch_default_init(script):
    torch.manual_seed(0)
    aspp = {"s4gan_mlmt": s4, "hung2018": hung2018, "latent_classes": lc}[script].ASPP(64, 5)
    bound = 1 / math.sqrt(64 * 9)                                         # PyTorch's U(-1/sqrt(fan_in), +)
    for conv in aspp.conv2d_list:
        assert (conv.bias != 0).all() and conv.bias.abs().max() <= bound   # released deeplab.py: default init
        assert abs(conv.weight.std().item() - 0.01) < 0.001


def test_h2_s4_mlmt_ramp_follows_mlmt_epochs():
    ramp = lambda e, b, n: 0.0 if e <= b else min(1.0, (e - b) * 2 / n)     # released train_mlmt.py
    assert [s4.cons_weight(e, 10, 100) for e in (10, 11, 60, 99)] == [0.0, 0.02, 1.0, 1.0]   # card 10.12
    for n, b in ((100, 10), (20, 2), (7, 1)):
        assert [s4.cons_weight(e, b, n) for e in range(n)] == [ramp(e, b, n) for e in range(n)]


def test_h2_s4_fuse_with_student_writes_and_uses_the_students_scores(tmp_path):
    out = str(tmp_path / "m")
    s4.main(["--data", "synthetic", "--stage", "mlmt", "--labeled", "0.02", "--mlmt-epochs", "4", "--burn-in", "1",
             "--mlmt-batch-size", "10", "--mlmt-batch-size-unl", "8", "--mlmt-eval-every", "4", "--mlmt-size", "32",
             "--fuse-with", "student", "--out", out])
    logs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [r["cons_weight"] for r in logs] == [0.0, 0.0, 0.5, 1.0]    # (e - 1) * 2 / 4 after one burn-in epoch
    source = common.make_source("synthetic", **s4.SYNTHETIC_SIZE)
    state = torch.load(os.path.join(out, "mlmt_last.pt"), weights_only=True)
    val = s4.MLMTDataset(source, source.splits["val"], 32, 6, train=False)
    x = val.normalize.batch(torch.stack([val[k][0] for k in range(len(val))]))   # uint8 -> normalised, as the loop
    probs = {}
    for name in ("student", "teacher"):
        net = s4.make_classifier("resnet10", 6, "none")
        net.load_state_dict(state[name])
        with torch.no_grad():
            probs[name] = torch.sigmoid(net.eval()(x))
    written = s4.read_scores(os.path.join(out, "mlmt_val_scores.csv"), source.splits["val"], source.CLASSES)
    written = torch.stack([written[i] for i in source.splits["val"]])
    assert torch.allclose(written, probs["student"], atol=2e-5)
    assert not torch.allclose(written, probs["teacher"], atol=1e-3)


def test_h2_s4_discriminator_pools_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    D = s4.Discriminator(4, ndf=8).eval()
    x = torch.randn(2, 7, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, feat = D(x)
        h = x
        for conv in D.convs:
            h = D.leaky_relu(conv(h))                                     # bf16 activations, as D computes them
    assert h.dtype == torch.bfloat16 and feat.dtype == torch.float32
    assert torch.equal(feat, h.float().mean((2, 3)))


def test_h2_s4_ema_foreach_equals_the_loop():
    torch.manual_seed(0)
    teacher, student = s4.make_classifier("resnet10", 6, "none"), s4.make_classifier("resnet10", 6, "none")
    ref = [p.detach().clone() for p in teacher.parameters()]
    for step in (1, 5, 10**6):
        a = min(1 - 1 / (step + 1), 0.999)
        for pt, ps in zip(ref, student.parameters()):
            pt.mul_(a).add_(ps.detach(), alpha=1 - a)
        s4.ema_update(teacher, student, step, 0.999)
        assert all(torch.equal(p, r) for p, r in zip(teacher.parameters(), ref))


# ===============================================================================================================
# H1: cross-cutting fidelity and CUDA-device fixes (issue 13 items 1-3, 5-7, 18; issue 14 items 1, 2, 6, 7)
# ===============================================================================================================
SCRIPTS = {"hung2018": hung2018, "latent_classes": lc, "luc2016": luc2016, "s4gan_mlmt": s4, "dual_disc": dd}
QUIRK_SCRIPTS = (hung2018, lc, s4)


def _old_sgd(listing, params, grads, lrs, momentum, wd, nesterov, accumulate=True):
    """Direct emulation of the released code's optimizer: PyTorch <= 0.4 SGD over a group in which a parameter is
    listed several times (`listing`: names in the order the released helper yields them). Each listing does
    d_p = p.grad; d_p.add_(wd, p) in place; buf = d_p.clone() the first time, else buf.mul_(m).add_(d_p);
    d_p = d_p + m * buf if nesterov else buf; p.add_(-lr, d_p). accumulate=False: the decay recomputed each time."""
    p = {n: t.clone() for n, t in params.items()}
    state = {}
    for lr, step_grads in zip(lrs, grads):
        g = {n: t.clone() for n, t in step_grads.items()}      # p.grad of this iteration
        for n in listing:
            if accumulate:
                g[n] += wd * p[n]                              # in place into p.grad: carried to the next listing
                d_p = g[n]
            else:
                d_p = g[n] + wd * p[n]
            if n not in state:
                state[n] = d_p.clone()
            else:
                state[n] = momentum * state[n] + d_p
            d_p = d_p + momentum * state[n] if nesterov else state[n]
            p[n] = p[n] - lr * d_p
    return p


@pytest.mark.parametrize("module", QUIRK_SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("nesterov", [False, True])
def test_h1_official_sgd_is_pytorch04_sgd_over_the_listings(module, nesterov):
    gen = torch.Generator().manual_seed(3)
    shapes = {"stem": (4, 3), "conv": (5,), "down": (2, 2, 2), "head": (3,)}
    k = {"stem": 1, "conv": 3, "down": 4, "head": 1}
    params = {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    grads = [{n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in shapes.items()} for _ in range(3)]
    lrs, wd, momentum = [0.1, 0.07, 0.04], 0.05, 0.9         # a large decay, so that its accumulation shows
    # the released helper's order: stem, then per stage the stage, the block, the conv (and the downsample's two)
    listing = ["stem", "conv", "down", "conv", "down", "conv", "down", "down"]
    tensors = {n: t.clone() for n, t in params.items()}
    body = ["stem", "conv", "down"]
    opt = module.OfficialSGD([dict(params=[tensors[n] for n in body], k=[k[n] for n in body]),
                              dict(params=[tensors["head"]], k=[1])], momentum, wd, nesterov)
    for lr, g in zip(lrs, grads):
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr, 10 * lr
        for n, t in tensors.items():
            t.grad = g[n].clone()
        opt.step()
    ref = _old_sgd(listing, {n: params[n] for n in body}, [{n: g[n] for n in body} for g in grads], lrs, momentum,
                   wd, nesterov)
    ref["head"] = _old_sgd(["head"], {"head": params["head"]}, [{"head": g["head"]} for g in grads],
                           [10 * lr for lr in lrs], momentum, wd, nesterov)["head"]
    modern = _old_sgd(listing, {n: params[n] for n in body}, [{n: g[n] for n in body} for g in grads], lrs,
                      momentum, wd, nesterov, accumulate=False)
    for n in shapes:
        assert torch.allclose(tensors[n], ref[n], rtol=0, atol=1e-12), n
    assert torch.allclose(tensors["stem"], modern["stem"], rtol=0, atol=1e-12)   # k = 1: the two agree
    for n in ("conv", "down"):                                  # k = 3, 4: the accumulated decay is what is done
        assert (tensors[n] - modern[n]).abs().max() > 1e-4, n
    # the momentum buffers are the optimizer's state: a copy loaded from state_dict continues identically
    copies = {n: t.detach().clone() for n, t in tensors.items()}
    opt2 = module.OfficialSGD([dict(params=[copies[n] for n in body], k=[k[n] for n in body]),
                               dict(params=[copies["head"]], k=[1])], momentum, wd, nesterov)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))      # as torch.save and torch.load would
    for o, ts in ((opt, tensors), (opt2, copies)):
        for n, t in ts.items():
            t.grad = grads[0][n].clone()
        o.step()
    for n in shapes:
        assert torch.equal(tensors[n], copies[n]), n


@pytest.mark.parametrize("module", QUIRK_SCRIPTS, ids=lambda m: m.__name__)
def test_h1_quirk_flags_no_forms_nesterov_and_amp(module):
    data = "context" if module is s4 else "synthetic"          # --official-context-aug is a Context quirk

    def resolved(*argv):
        return module.resolve_args(module.get_parser().parse_args(["--data", data, *argv]))

    a = resolved()
    assert a.no_amp is False and a.official_optimizer is False
    q = resolved("--official-quirks")
    assert q.no_amp is True and q.official_optimizer is True                   # the released code ran float32
    assert resolved("--official-quirks", "--amp").no_amp is False               # one quirk undone
    assert resolved("--no-amp").no_amp is True and resolved("--amp", "--no-amp").no_amp is True
    assert resolved("--official-quirks", "--no-official-optimizer").official_optimizer is False
    flags = ["--rgb-input"] if module is not s4 else ["--official-input", "--stride-in-1x1", "--official-dropout",
                                                      "--official-context-aug", "--fuse-logits"]
    for flag in flags:
        dest = flag[2:].replace("-", "_")
        assert getattr(resolved("--official-quirks"), dest) is True, flag
        assert getattr(resolved("--official-quirks", "--no" + flag[1:]), dest) is False, flag
        assert getattr(resolved(flag), dest) is True, flag
    # OfficialSGD takes the resolved Nesterov setting (the quirk set turns it off, an explicit flag wins)
    model = module.DeepLabV2(3, "resnet18", (1, 2, 3, 4), width=8) if module is not lc else \
        lc.DeepLabV2(3, 4, "resnet18", (1, 2, 3, 4), width=8)
    for argv, nesterov in ((["--official-quirks"], False), (["--official-quirks", "--nesterov"], True)):
        args = resolved("--optimizer", "sgd", *argv)
        opt_S, _ = module.make_optimizers(model, torch.nn.Linear(1, 1), args)
        assert isinstance(opt_S, module.OfficialSGD) and opt_S.param_groups[0]["nesterov"] is nesterov


class _StopAtSetDevice(Exception):
    pass


@pytest.mark.parametrize("name", list(SCRIPTS))
@pytest.mark.parametrize("no_amp", [False, True])
def test_h1_cuda_set_up_device_and_tf32(name, no_amp, monkeypatch, tmp_path):
    """--device cuda:1 selects GPU 1 with torch.cuda.set_device (checked on the CPU by stopping the run there), after
    the TF32 switches, which --no-amp turns off."""
    calls = []

    def set_device(d):
        calls.append(d)
        raise _StopAtSetDevice

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    switches = ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
                (torch.backends.cudnn, "benchmark"))
    saved = [getattr(obj, attr) for obj, attr in switches]
    try:
        for obj, attr in switches:
            setattr(obj, attr, no_amp)                         # the opposite of what the run must set
        with pytest.raises(_StopAtSetDevice):
            SCRIPTS[name].main(["--data", "synthetic", "--device", "cuda:1", "--out", str(tmp_path / "r")] +
                               (["--no-amp"] if no_amp else []))
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    finally:
        for (obj, attr), value in zip(switches, saved):
            setattr(obj, attr, value)
    assert calls == [1] and tf32 == (not no_amp, not no_amp)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_h1_out_naming_a_file_is_one_line_and_writes_nothing(name, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name].main(["--data", "synthetic", "--out", str(target), "--num-steps", "2"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("error: --out ") and "Traceback" not in err[0], err
    assert target.read_text() == "keep me\n" and os.listdir(tmp_path) == ["notes.txt"]


def _record_D_fakes(monkeypatch, cls):
    """Batch sizes D sees while it is being trained (its parameters require grad only in step (3)): fake, real."""
    sizes, forward = [], cls.forward

    def wrapped(self, x):
        if torch.is_grad_enabled() and next(self.parameters()).requires_grad:
            sizes.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(cls, "forward", wrapped)
    return sizes


# 4 of 8 iterations (no final evaluation), batch 2, a narrow network: the loop's control flow is what is tested
H1_FAST = ["--num-steps", "8", "--stop-at", "4", "--batch-size", "2", "--width", "8", "--log-every", "1",
           "--save-every", "4"]


def test_h1_hung_semi_start_adv_gates_the_whole_unlabeled_block(tmp_path, monkeypatch):
    sizes = _record_D_fakes(monkeypatch, FCDiscriminator)
    out = str(tmp_path / "r")
    run_main(["--data", "synthetic", "--out", out, "--semi-start", "1", "--semi-start-adv", "3"] + H1_FAST)
    log = read_log(out)
    for r in log[:3]:                                          # iterations 0-2: no unlabeled batch at all
        assert "loss_adv_u" not in r and "loss_semi" not in r, r
    assert "loss_adv_u" in log[3] and "loss_semi" in log[3]
    assert sizes[0::2] == [2, 2, 2, 4]                         # D's fakes: labeled only until --semi-start-adv


def test_h1_hung_table6_L_semi_without_L_adv_runs_the_unlabeled_batch_from_0(tmp_path, monkeypatch):
    sizes = _record_D_fakes(monkeypatch, FCDiscriminator)
    out = str(tmp_path / "r")
    run_main(["--data", "synthetic", "--out", out, "--lambda-adv", "0", "--lambda-adv-unl", "0", "--semi-start", "2"]
             + H1_FAST)
    log = read_log(out)
    assert sizes[0::2] == [4, 4, 4, 4]                        # unlabeled predictions are D's fakes from iteration 0
    assert [("loss_semi" in r) for r in log] == [False, False, True, True]   # L_semi from --semi-start 2
    assert all("loss_adv" not in r for r in log)


def test_h1_lc_semi_start_adv_and_unlabeled_batch_before_cons_start(tmp_path, monkeypatch):
    sizes = _record_D_fakes(monkeypatch, lc.FCDiscriminator)
    out = str(tmp_path / "a")
    lc.main(["--data", "synthetic", "--out", out, "--cons-start", "1", "--semi-start-adv", "3", "--num-latent", "5"]
            + H1_FAST)
    log = read_log(out)
    for r in log[:3]:
        assert "loss_adv_u" not in r and "loss_cons" not in r, r
    assert "loss_adv_u" in log[3] and "loss_cons" in log[3]
    assert sizes[0::2] == [2, 2, 2, 4]
    # lambda_adv_u = 0: the unlabeled batch still passes through S from iteration 0 and joins D's fakes (Hung's code)
    sizes.clear()
    out = str(tmp_path / "b")
    lc.main(["--data", "synthetic", "--out", out, "--lambda-adv-unl", "0", "--cons-start", "2", "--num-latent", "5"]
            + H1_FAST)
    log = read_log(out)
    assert sizes[0::2] == [4, 4, 4, 4]
    assert [("loss_cons" in r) for r in log] == [False, False, True, True] and all("loss_adv_u" not in r for r in log)


def test_h1_lc_loss_latent_default_is_eq2_over_NHW_with_void_pixels():
    C, L, N, H, W = 3, 4, 2, 3, 5
    prob_l = _probs(N, L, H, W, seed=7)
    y = _labels(N, H, W, C, seed=8)
    y[0, 1, :], y[1, :, 0] = 255, 255                          # void pixels count in N*H*W but add nothing to P_b
    P = torch.zeros(C, L, dtype=torch.float64)                 # Eq. (2): 1/(NHW) sum_{n,h,w} S_l Y
    for n in range(N):
        for h in range(H):
            for w in range(W):
                if y[n, h, w] != 255:
                    P[y[n, h, w]] += prob_l[n, :, h, w] / (N * H * W)
    direct = -sum(P[c, l] * math.log(P[c, l] / P[:, l].sum()) for c in range(C) for l in range(L))   # Eqs. (1), (3)
    assert lc.loss_latent(prob_l, y, C)[0].item() == pytest.approx(float(direct), rel=1e-6)
    V = int((y != 255).sum())
    assert lc.loss_latent(prob_l, y, C, norm="valid")[0].item() == pytest.approx(float(direct) * N * H * W / V, rel=1e-6)
    assert lc.resolve_args(lc.get_parser().parse_args(["--data", "voc"])).latent_norm == "all"


# ---------------------------------------------------------------------------------------------------------------
# H3: dual_disc fidelity fixes (issue 13, items 12-17)
# ---------------------------------------------------------------------------------------------------------------
def _dd_small_g(num_classes=6):
    return dd.DeepLabV3Plus(num_classes, "resnet14", 16, aspp_rates=(1, 2, 3), aspp_channels=16,
                            low_level_channels=8, decoder_channels=16)


def test_dd_freeze_bn_stats_reaches_the_head_and_cityscapes_default():
    """13.12: --freeze-bn-stats puts every BatchNorm of G in eval mode, the ASPP image-pooling BN and the decoder's
    included; at batch 2 that BN no longer outputs exactly -1/+1 per channel. Cityscapes (batch 2) freezes by
    default (card 3), VOC keeps Hung's batch statistics."""
    torch.manual_seed(0)
    model = _dd_small_g()
    pool_bn = model.aspp.convs[4][2]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert pool_bn in bns and model.decoder[1] in bns and model.reduce[1] in bns
    seen = {}
    pool_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach()))
    x = torch.randn(2, 3, 64, 64)
    dd.set_train_mode(model, False)                       # control: batch statistics over 2 values per channel
    model(x)
    assert torch.allclose(seen["out"].abs(), torch.ones_like(seen["out"]), atol=0.05)
    dd.set_train_mode(model, True)
    assert all(not m.training for m in bns) and model.training and model.aspp.project[3].training   # dropout on
    model(x)
    assert not torch.allclose(seen["out"].abs(), torch.ones_like(seen["out"]), atol=0.05)
    parse = lambda *a: dd.resolve_args(dd.get_parser().parse_args(list(a)))
    assert parse("--data", "cityscapes").freeze_bn_stats is True
    assert parse("--data", "cityscapes", "--no-freeze-bn-stats").freeze_bn_stats is False
    assert parse("--data", "voc").freeze_bn_stats is False
    assert parse("--data", "voc", "--freeze-bn-stats").freeze_bn_stats is True


def test_dd_pad_mask_and_d1_threshold_without_padding():
    """13.13: padded pixels are exactly 0 in all channels after normalisation, real pixels never (every 8-bit value,
    imagenet and caffe means); D1's threshold input is zeroed at padding, and unchanged for an unpadded image."""
    values = np.arange(256, dtype=np.uint8)[:, None, None].repeat(3, 2)
    for norm in (common.Normalize("imagenet"), common.Normalize("caffe"), common.Normalize("caffe", bgr=False)):
        assert (norm(values) != 0).all()
    rng = np.random.RandomState(0)
    small = rng.randint(0, 256, (30, 36, 3)).astype(np.uint8)
    full = rng.randint(0, 256, (48, 48, 3)).astype(np.uint8)
    norm = common.Normalize("imagenet")
    tf = common.TrainTransform(norm, crop=(48, 48))
    on_device = lambda out: norm.batch(out[0][None], out[2][None])[0]     # uint8 + valid box -> normalised, padded 0
    x0 = on_device(tf(small, np.zeros((30, 36), np.uint8), random.Random(0)))
    x1 = on_device(tf(full, np.zeros((48, 48), np.uint8), random.Random(0)))
    xe = on_device(common.EvalTransform(norm, pad_to=(48, 48))(small, np.zeros((30, 36), np.uint8)))
    x = torch.stack([x0, x1])                                            # (2, 3, 48, 48): padded, not padded
    expected = torch.zeros(2, 48, 48, dtype=torch.bool)
    expected[0, :30, :36] = True
    expected[1] = True
    assert torch.equal(dd.pad_mask(x), expected) and torch.equal(dd.pad_mask(xe[None])[0], expected[0])
    torch.manual_seed(0)
    d1 = dd.ImageDiscriminator(6, ndf=8)
    p = F.softmax(torch.randn(2, 6, 48, 48), 1)
    z = dd.d1_unlabeled(d1, p, x)
    assert z[0] == d1(p * expected[:, None].float())[0] and z[0] != d1(p)[0]      # padding does not count
    assert z[1] == d1(p)[1]                                                         # no padding: unchanged
    t = dd.threshold(z, "d1", 0.9)
    assert t[1].item() == dd.threshold(d1(p), "d1", 0.9)[1].item()


def test_dd_d1_never_sees_padding_in_training_and_evaluate(tmp_path, monkeypatch):
    """13.13 in the loop: with 80x80 synthetic images padded to 96x96 crops (no flips), every D1 input (the
    thresholds on unlabeled batches included) is 0 on the padding; evaluate() masks the val padding the same way.
    13.16: the full method adds L_ad on unlabeled images after the warm-up."""
    inputs = []
    fwd = dd.ImageDiscriminator.forward
    monkeypatch.setattr(dd.ImageDiscriminator, "forward",
                        lambda self, x: (inputs.append(x.detach()), fwd(self, x))[1])
    out = str(tmp_path / "r")
    dd.main(["--data", "synthetic", "--out", out, "--crop-size", "96", "96", "--no-random-mirror",
             "--num-pictures", "0"] + DD_TINY[:8])
    padded = [v for v in inputs if v.shape[-2:] == (96, 96)]
    assert len(padded) >= 8                                   # phase A: G's L_ad, D1 real and fake; B: + thresholds
    assert all(v[..., 80:, :].abs().max() == 0 and v[..., 80:].abs().max() == 0 for v in padded)
    log = [r for r in read_log(out) if "val_miou" not in r]
    assert all(math.isfinite(r["loss_adv_u"]) and 0 <= r["threshold"] <= 1 for r in log[2:])
    assert all("loss_adv_u" not in r for r in log[:2])
    # evaluate(): one val batch padded to 40x40 (like VOC's 505x505)
    norm = common.Normalize("imagenet")
    tf = common.EvalTransform(norm, pad_to=(40, 40))
    rng = np.random.RandomState(1)
    pairs = [tf(rng.randint(0, 256, (h, w, 3)).astype(np.uint8), rng.randint(0, 6, (h, w)).astype(np.uint8))
             for h, w in ((34, 30), (40, 40))]
    x = norm.batch(torch.stack([a for a, _, _ in pairs]), torch.stack([c for _, _, c in pairs]))   # as the loader
    batch = [(x, torch.stack([b for _, b, _ in pairs]).long(), None)]
    args = dd.resolve_args(dd.get_parser().parse_args(["--data", "synthetic", "--ndf", "8"]))
    D = dd.build_discriminators(6, args)
    inputs.clear()
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=False)
    _, calib, _ = dd.evaluate(_dd_small_g(), D, batch, 6, "cpu", amp, 0, args)
    assert len(inputs) == 1 and inputs[0][0, :, 34:].abs().max() == 0 and inputs[0][0, :, :, 30:].abs().max() == 0
    assert inputs[0][1].abs().min() > 0 and 0 <= calib["trusted_region"]["fraction_of_pixels"] <= 1


def test_dd_paper_optimiser_and_unlabeled_adversarial_defaults():
    """13.15: Sec. 4.1 names SGD with momentum 0.9 and weight decay 1e-4, no Nesterov (--nesterov keeps it).
    13.16: lambda_adv on unlabeled images is Hung's 0.001 (methods/README table) where the semi-supervised module
    runs, 0 in Table 3's rows without it."""
    parse = lambda *a: dd.resolve_args(dd.get_parser().parse_args(list(a)))
    model = _dd_small_g(21)
    args = parse("--data", "voc", "--ndf", "8")
    opt_S, _ = dd.make_optimizers(model, dd.build_discriminators(21, args), args)
    assert args.nesterov is False and all(not g["nesterov"] for g in opt_S.param_groups)
    args = parse("--data", "voc", "--ndf", "8", "--nesterov")
    opt_S, _ = dd.make_optimizers(model, dd.build_discriminators(21, args), args)
    assert all(g["nesterov"] for g in opt_S.param_groups)
    lam = {a: parse("--data", "voc", "--ablation", a).lambda_adv_unl for a in dd.ABLATIONS}
    assert lam == {"baseline": 0, "d2": 0, "d1": 0, "d1d2": 0, "static": 0.001, "full": 0.001}
    assert parse("--data", "voc", "--lambda-adv-unl", "0").lambda_adv_unl == 0


def test_dd_label_rgb_d2_with_unlabeled_adversarial_runs_past_the_warm_up(tmp_path, capsys):
    """13.17: D2 on the argmax label map (Table 6 design 3) gives no gradient to G, so L_ad on unlabeled images has
    nothing to train with D2 alone: the term is left out with a warning instead of crashing in backward()."""
    out = str(tmp_path / "r")
    dd.main(["--data", "synthetic", "--out", out, "--ablation", "d2", "--d2-input", "label_rgb",
             "--lambda-adv-unl", "0.001", "--num-pictures", "0"] + DD_TINY[:8])
    log = [r for r in read_log(out) if "val_miou" not in r]
    assert [r["iter"] for r in log] == [1, 2, 3, 4] and all("loss_adv_u" not in r for r in log)
    assert "L_ad on unlabeled images is left out" in capsys.readouterr().err
    args = dd.resolve_args(dd.get_parser().parse_args(["--data", "voc", "--d2-input", "label_rgb"]))
    assert dd.adv_unl_reaches_G(args)                     # with D1 (full method) its term still trains G


def test_dd_default_threshold_is_one_minus_d1():
    """13.14: by default an image that D1 rates fake (sigmoid(D1) near 0, as on every prediction once D1 is trained)
    gets a strict bar: trusted where sigmoid(D2) > 1 - sigmoid(D1); the literal reading stays `--threshold-mode d1`."""
    parse = lambda *a: dd.resolve_args(dd.get_parser().parse_args(list(a)))
    assert parse("--data", "voc").threshold_mode == "one_minus_d1"
    assert parse("--data", "voc", "--threshold-mode", "d1").threshold_mode == "d1"
    assert parse("--data", "voc", "--ablation", "static").threshold_mode == "static"
    conf = torch.tensor([[[0.5, 0.9], [0.97, 0.99]]])
    z1 = torch.logit(torch.tensor([0.05]))                                  # D1: the map looks fake
    t = dd.threshold(z1, parse("--data", "voc").threshold_mode, 0.9)
    _, trusted = dd.loss_semi(torch.randn(1, 3, 2, 2), torch.logit(conf)[:, None], t)
    assert trusted.tolist() == [[[False, False], [True, True]]]            # > 0.95 only
    _, literal = dd.loss_semi(torch.randn(1, 3, 2, 2), torch.logit(conf)[:, None], dd.threshold(z1, "d1", 0.9))
    assert literal.all()                                                    # > 0.05: every pixel


# ---------------------------------------------------------------------------------------------------------------
# H4 (issue 14, defects 3-5): one persistent loader per stream over a resumable (epoch, index) sampler, worker
# count from the CPU affinity, uint8 transport with normalisation on the device
# ---------------------------------------------------------------------------------------------------------------
def _h4_dataset(n=10, size=24, seed=0, **tf):
    src = common.SyntheticSource(size, n, 2, seed=1)
    tf = tf or dict(crop=(20, 20), scales=[0.5 + k / 10 for k in range(12)], mirror=True)
    return common.SegDataset(src, src.splits["train"], common.TrainTransform(common.Normalize(), **tf), seed)


def test_h4_sampler_same_batches_as_old_permutation_state_and_resume():
    old_order = lambda seed, epoch, n: torch.randperm(n, generator=torch.Generator().manual_seed(
        seed * 1000003 + epoch)).tolist()                                   # the permutation of the old InfiniteLoader
    s = iter(common.EpochBatchSampler(10, 4, seed=5))
    for epoch in range(2):
        o = old_order(5, epoch, 10)
        assert [next(s) for _ in range(3)] == [[(epoch, i) for i in o[b:b + 4]] for b in (0, 4, 8)]   # last: 2 kept
    s = iter(common.EpochBatchSampler(10, 4, seed=5, min_batch=3))
    assert [len(next(s)) for _ in range(4)] == [4, 4, 4, 4]                 # 2 < min_batch: dropped from each pass
    s = iter(common.EpochBatchSampler(10, 4, seed=5, state=(1, 2)))
    assert next(s) == [(1, i) for i in old_order(5, 1, 10)[8:]] and next(s)[0][0] == 2

    ds = _h4_dataset()
    straight = common.InfiniteLoader(ds, 4, seed=7)
    ref = [next(straight) for _ in range(7)]
    assert straight.state() == [2, 1]                                       # 3 batches per pass: 7 = 3 + 3 + 1
    assert [list(b[2]) for b in ref[:3]] == [[ds.ids[i] for i in old_order(7, 0, 10)[b:b + 4]] for b in (0, 4, 8)]
    part = common.InfiniteLoader(ds, 4, seed=7)
    for _ in range(3):
        next(part)
    assert part.state() == [0, 3]                                           # the old meaning: pass 0 finished
    for state in (part.state(), [1, 0], [1, 1]):                            # resumed at / after a pass boundary, mid-pass
        skip = {(0, 3): 3, (1, 0): 3, (1, 1): 4}[tuple(state)]
        resumed = common.InfiniteLoader(ds, 4, seed=7, state=state, ahead=True)    # + the copy-ahead path on CPU
        for k in range(skip, 7):
            x, y, ids = next(resumed)
            assert list(ids) == list(ref[k][2]) and torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1]), (state, k)
        assert resumed.state() == [2, 1]                                    # batches consumed, not fetched ahead
    assert ref[0][0].dtype == torch.float32 and ref[0][1].dtype == torch.int64


def test_h4_uint8_transport_equals_the_float_path():
    """The old path normalised first, padded with 0.0 (image) and 255 (label), cropped and mirrored; the new one
    ships uint8 and a box and normalises on the device: the same float32 values, padding exactly +0.0."""
    img = np.arange(11 * 13 * 3, dtype=np.int64).reshape(11, 13, 3).__mod__(251).astype(np.uint8)
    lab = (np.arange(11 * 13).reshape(11, 13) % 5).astype(np.uint8)
    for norm in (common.Normalize("imagenet"), common.Normalize("caffe"), common.Normalize("caffe", bgr=False)):
        for seed, (ch, cw) in [(s, c) for s in range(8) for c in ((16, 10), (8, 16), (14, 15))]:
            rng = random.Random(seed)                                       # the transform's draws, replayed
            ph, pw = max(ch - 11, 0), max(cw - 13, 0)
            y0, x0, flip = rng.randint(0, 11 + ph - ch), rng.randint(0, 13 + pw - cw), rng.random() < 0.5
            f = np.pad(norm(img), ((0, ph), (0, pw), (0, 0)), constant_values=0.0)[y0:y0 + ch, x0:x0 + cw]
            g = np.pad(lab, ((0, ph), (0, pw)), constant_values=255)[y0:y0 + ch, x0:x0 + cw]
            f, g = (f[:, ::-1], g[:, ::-1]) if flip else (f, g)
            u, v, box = common.TrainTransform(norm, crop=(ch, cw), mirror=True)(img, lab, random.Random(seed))
            assert u.dtype == v.dtype == torch.uint8
            x = norm.batch(u[None], box[None])[0]
            assert torch.equal(x, torch.from_numpy(np.ascontiguousarray(f.transpose(2, 0, 1)))), (norm.mode, seed)
            assert torch.equal(v, torch.from_numpy(np.ascontiguousarray(g)))
            assert not torch.signbit(x[:, torch.from_numpy(g.copy()) == 255]).any()   # +0.0, not -0.0
        u, v, box = common.EvalTransform(norm, pad_to=(15, 20))(img, lab)
        x = norm.batch(u[None], box[None])[0]
        assert torch.equal(x[:, :11, :13], torch.from_numpy(norm(img).transpose(2, 0, 1).copy()))
        assert (x[:, 11:] == 0).all() and (x[:, :, 13:] == 0).all() and not torch.signbit(x[:, 11:]).any()
        assert (v[11:] == 255).all() and (v[:, 13:] == 255).all()
    loader = common.EvalLoader(common.SegDataset(_h4_dataset().source, ["syn00010", "syn00011"],
                                                 common.EvalTransform(common.Normalize(), pad_to=(30, 30))), 2)
    (x, y, ids), = list(loader)
    assert x.shape == (2, 3, 30, 30) and y.dtype == torch.int64 and (x[:, :, 24:] == 0).all() and list(ids) == ["syn00010", "syn00011"]


def test_h4_default_workers_from_the_affinity(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    monkeypatch.setattr(common, "CGROUP_CPU_MAX", str(quota))
    monkeypatch.setattr(os, "cpu_count", lambda: 256)                      # must not be used
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert common.available_cpus() == 12
    assert common.default_workers("cpu", 2, 1) == 0                         # CPU default stays 0
    assert common.default_workers("cuda", 2, 1) == 5                        # (12 - 1 - 1) // 2; gt stream: 1
    assert common.default_workers("cuda:1", 1) == 11 and common.default_workers("cuda", 3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert common.default_workers("cuda", 2, 1) == 7                        # bounded: 2 * 7 + 1 = 15 processes
    quota.write_text("300000 100000\n")                                     # a container limited to 3 CPUs
    assert common.available_cpus() == 3 and common.default_workers("cuda", 2, 1) == 1
    args = hung2018.resolve_args(hung2018.get_parser().parse_args(["--data", "synthetic", "--device", "cuda"]))
    assert args.workers == 1


def test_h4_persistent_workers_draw_new_augmentations_every_pass():
    ds = _h4_dataset(n=4)
    loader = common.InfiniteLoader(ds, 2, seed=3, workers=2)
    batches = [next(loader) for _ in range(4)]                              # 2 passes over 4 images
    seen = {}
    for k, (x, y, ids) in enumerate(batches):
        for j, i in enumerate(ids):
            seen.setdefault(i, []).append((x[j], y[j]))
            epoch = k // 2                                                  # what a fresh process draws for this item
            u, v, box, _ = ds[(epoch, ds.ids.index(i))]
            assert torch.equal(x[j], ds.transform.normalize.batch(u[None], box[None])[0]) and torch.equal(y[j], v.long())
    assert sorted(seen) == sorted(ds.ids) and all(len(v) == 2 for v in seen.values())
    assert all(not torch.equal(a[0], b[0]) for a, b in seen.values())      # no augmentation repeated across passes
    assert loader.state() == [1, 2]


def test_h4_mlmt_batches_equal_the_per_epoch_loaders():
    """s4gan_mlmt's MLMT stream, now two loaders made once: the same batches as one DataLoader per labeled epoch and
    per unlabeled pass (passes epoch * 1000 + k, restarted every epoch, the last partial batch kept), also when
    started at a later epoch (resume)."""
    import itertools
    import s4gan_mlmt as s4
    src = common.SyntheticSource(24, 12, 2, seed=1)
    lab_ds = s4.MLMTDataset(src, src.splits["train"][:5], 16, 6, seed=3)
    unl_ds = s4.MLMTDataset(src, src.splits["train"][5:9], 16, 6, seed=4, with_labels=False)   # passes of 3 + 1
    order = lambda seed, p, n: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + p)).tolist()
    stack = lambda ds, p, idx: [torch.stack(t) for t in zip(*[ds[(p, i)] for i in idx])]
    expected = []                                                       # the old per-epoch loaders, by hand
    for epoch in range(3):
        unl = [b for p in range(3) for o in [order(11, epoch * 1000 + p, 4)]
               for b in [(epoch * 1000 + p, o[0:3]), (epoch * 1000 + p, o[3:])]]
        o = order(10, epoch, 5)
        expected += [(stack(lab_ds, epoch, o[b:b + 2]), stack(unl_ds, *unl[k])) for k, b in enumerate((0, 2, 4))]
    for start in (0, 1):
        batches, steps = s4.mlmt_batches(lab_ds, unl_ds, 2, 3, 10, start, 0, False)
        assert steps == 3
        got = list(itertools.islice(batches, 3 * (3 - start)))
        for (gl, gu), (el, eu) in zip(got, expected[3 * start:]):
            assert all(torch.equal(a, b) for a, b in zip(gl, el)) and all(torch.equal(a, b) for a, b in zip(gu, eu))
        assert gl[0].dtype == torch.uint8 and len(got) == 3 * (3 - start)


# ================================================================================================================
# Issue 14 (measurability) and 13.18: synthetic-voc / synthetic-cityscapes, --benchmark, --compile, --data-root file
# ================================================================================================================
SCRIPTS = {"hung2018": hung2018, "latent_classes": lc, "luc2016": luc2016, "s4gan_mlmt": s4, "dual_disc": dd}
# the paper's VOC preset on synthetic-voc, shrunk only where CPU time demands it (network width, crop, batch)
BENCH_SMALL = {
    "hung2018": ["--backbone", "resnet18", "--width", "8", "--ndf", "8"],
    "latent_classes": ["--backbone", "resnet18", "--width", "8", "--ndf", "8"],
    "luc2016": ["--segmenter", "farabet", "--width", "4", "--adversary", "largefov-light"],
    "s4gan_mlmt": ["--backbone", "resnet18", "--width", "8", "--ndf", "8"],
    "dual_disc": ["--backbone", "resnet14", "--width-per-group", "4", "--aspp-channels", "16", "--ndf", "8"],
}
BENCH_KEYS = {"device", "dtype", "compile", "batch_size", "crop", "resize", "data", "workers", "torch", "iterations",
              "warmup_iterations", "first_timed_iteration", "wall_s", "iterations_per_s", "images_per_s",
              "data_wait_share", "peak_gpu_memory_gib", "flops_per_iteration", "achieved_tflops", "peak_bf16_tflops",
              "peak_source", "fraction_of_peak", "graphs_compiled_in_warmup", "graphs_compiled_in_timed_window",
              "sync_warnings"}


@pytest.fixture
def one_thread():
    """The benchmark tests run tiny tensors: one thread avoids OpenMP barrier stalls on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bench(name, out, *extra):
    argv = ["--data", "synthetic-voc", "--init", "none", "--benchmark", "2", "--batch-size", "2", "--crop-size", "65",
            "65", "--out", str(out)] + BENCH_SMALL[name] + list(extra)
    report = SCRIPTS[name].main(argv)
    with open(out / "benchmark.json") as f:
        assert json.load(f) == report
    return report


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_benchmark_synthetic_voc_cpu(name, tmp_path, one_thread):
    out = tmp_path / "run"
    r = _bench(name, out, *(["--peak-tflops", "2"] if name == "hung2018" else []))
    assert set(r) == BENCH_KEYS
    assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["compile"] is False and r["data"] == "synthetic-voc"
    assert r["batch_size"] == 2 and tuple(r["crop"]) == (65, 65) and r["torch"] == torch.__version__
    assert r["iterations"] == 2 and r["warmup_iterations"] == 1
    paper = SCRIPTS[name].resolve_args(SCRIPTS[name].get_parser().parse_args(["--data", "voc", "--init", "none"]))
    end = luc2016.total_iterations(paper) if name == "luc2016" else paper.num_steps   # the VOC preset's schedule
    assert r["first_timed_iteration"] == end - 2                              # the schedule's last iterations
    assert r["wall_s"] > 0 and r["iterations_per_s"] == pytest.approx(2 / r["wall_s"])
    per_it = {"luc2016": 2, "s4gan_mlmt": 6}.get(name, 4)       # images drawn: labeled, unlabeled (s4GAN: D's real)
    assert r["images_per_s"] == pytest.approx(per_it * 2 / r["wall_s"])
    assert 0 < r["data_wait_share"] < 1 and r["peak_gpu_memory_gib"] is None
    assert r["flops_per_iteration"] > 1e8
    assert r["achieved_tflops"] == pytest.approx(r["flops_per_iteration"] * 2 / r["wall_s"] / 1e12)
    if name == "hung2018":                                                    # --peak-tflops: no table needed
        assert r["peak_bf16_tflops"] == 2 and r["peak_source"] == "--peak-tflops"
        assert r["fraction_of_peak"] == pytest.approx(r["achieved_tflops"] / 2)
    else:
        assert r["peak_bf16_tflops"] is None and r["fraction_of_peak"] is None   # CPU: no known peak
    assert r["graphs_compiled_in_warmup"] is None and r["sync_warnings"] is None
    files = set(os.listdir(out))
    assert "benchmark.json" in files and not files & {"metrics.json", "last.pt", "predictions.png", "best.pt"}, files


def test_benchmark_compile_no_recompile_and_plain_names(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(common, "COMPILE_OPTIONS", {"backend": "eager"})   # dynamo's graphs without inductor's cost
    r = _bench("hung2018", tmp_path / "bench", "--compile")
    assert r["compile"] is True and r["warmup_iterations"] == 5
    assert r["graphs_compiled_in_warmup"] >= 2                            # S and D at least
    assert r["graphs_compiled_in_timed_window"] == 0                         # no recompilation per iteration
    # compiled in place: the scripts keep (and save) the module itself, whose state dict has the plain names
    model, streams = hung2018.DeepLabV2(6, "resnet18", (1, 2, 3, 4), width=8), {"labeled": iter([])}
    common.compile_modules([model], streams, 4)
    assert type(model) is hung2018.DeepLabV2 and isinstance(streams["labeled"], common.TimedStream)
    assert model(torch.zeros(2, 3, 33, 33)).shape[:2] == (2, 6)
    assert "conv1.weight" in model.state_dict() and not any("_orig_mod" in k for k in model.state_dict())


def test_timed_stream_counts_waits_and_drops_short_batches():
    class Stream:
        def __init__(self):
            self.sizes, self.k = [3, 3, 1, 3], 0

        def __next__(self):
            n = self.sizes[self.k % 4]
            self.k += 1
            return [torch.zeros(n, 3, 2, 2), torch.zeros(n, 2, 2), ["id"] * n]

        def state(self):
            return [0, self.k]
    s = common.TimedStream(Stream(), full_batch=3)
    assert [len(next(s)[0]) for _ in range(4)] == [3, 3, 3, 3] and s.state() == [0, 5]   # the 1 was skipped
    assert s.images == 12 and s.wait > 0
    plain = common.TimedStream(Stream())
    assert [len(next(plain)[0]) for _ in range(4)] == [3, 3, 1, 3] and plain.images == 10
    labels = common.TimedStream(iter([torch.zeros(2, 4, 4)]))
    next(labels)
    assert labels.images == 0                                                # labels-only streams: no images


def test_synthetic_scene_sources():
    import hashlib
    import pickle
    voc, cs = common.make_source("synthetic-voc"), common.make_source("synthetic-cityscapes")
    assert (len(voc.splits["train"]), len(voc.splits["val"])) == (10582, 1449)
    assert (len(cs.splits["train"]), len(cs.splits["val"])) == (2975, 500)
    assert voc.CLASSES == common.VOCSource.CLASSES and voc.NUM_CLASSES == 21
    assert cs.CLASSES == common.CityscapesSource.CLASSES and cs.NUM_CLASSES == 19
    for src in (voc, cs):                                # nothing materialised: only the id lists, no arrays
        assert not any(isinstance(v, np.ndarray) for v in vars(src).values())
        assert len(pickle.dumps(src)) < 400_000
    seen = set()
    for i in voc.splits["train"][:6] + voc.splits["val"][-2:]:
        img, lab = voc.read(i)
        assert img.dtype == np.uint8 and lab.dtype == np.uint8 and img.shape[:2] == lab.shape
        assert max(lab.shape) == 500 and 333 <= min(lab.shape) <= 500
        assert ((lab < 21) | (lab == 255)).all() and (lab == 255).any() and (lab > 0).any() & (lab < 255).any()
        assert np.array_equal(voc.read_label(i), lab)                          # labels without the pixels
        seen |= set(np.unique(lab).tolist())
        a2, l2 = voc.read(i)                                                    # same (seed, index), same bytes
        assert np.array_equal(a2, img) and np.array_equal(l2, lab)
    assert len(seen - {0, 255}) >= 4                                            # several object classes
    assert not np.array_equal(voc.read_label(voc.splits["train"][0]), voc.read_label(voc.splits["train"][1])[:1])
    other = common.SyntheticSceneSource("voc", seed=1)
    assert any(other.read_label(i).shape != voc.read_label(i).shape or
               not np.array_equal(other.read_label(i), voc.read_label(i)) for i in voc.splits["train"][:3])
    img, lab = cs.read(cs.splits["val"][0])
    assert img.shape == (1024, 2048, 3) and lab.shape == (1024, 2048)
    assert ((lab < 19) | (lab == 255)).all() and (lab[-20:] == 255).all()      # void strip at the bottom
    assert len(set(np.unique(lab).tolist()) - {0, 255}) >= 2
    assert np.array_equal(cs.read_label(cs.splits["val"][0]), lab)
    with pytest.raises(common.DataError):
        voc.read("syn00001")
    assert common.palette("synthetic-cityscapes")[0].tolist() == list(common.CITYSCAPES_COLORS[0])
    # the 80 px synthetic dataset is unchanged (its results are published): images and labels byte for byte
    s = common.SyntheticSource()
    digest = hashlib.sha256(s.images.tobytes() + s.labels.tobytes()).hexdigest()
    assert digest == "26e47dee2023889652df026c0530e849df93fa246e6ad1efbc800348eb717e41"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_data_root_naming_a_file_is_one_line(name, tmp_path, capsys):
    f = tmp_path / "VOC.tar"
    f.write_bytes(b"not a folder")
    out = tmp_path / "run"
    for extra in ([], ["--download"]):
        with pytest.raises(SystemExit) as e:
            SCRIPTS[name].main(["--data", "voc", "--data-root", str(f), "--init", "none", "--out", str(out)] + extra)
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
        assert len(err) == 1 and err[0].startswith("error: ") and "is a file" in err[0], err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["VOC.tar"]


def test_benchmark_bad_arguments(tmp_path, capsys):
    expect_error(capsys, ["--data", "synthetic", "--benchmark", "0"], "--benchmark")
    expect_error(capsys, ["--data", "synthetic", "--benchmark", "2", "--num-steps", "3"], "raise --num-steps")
    for script in SCRIPTS.values():                     # a resumed run is not timed (its own schedule position)
        args = script.get_parser().parse_args(["--data", "synthetic", "--benchmark", "2"])
        args.resume = str(tmp_path)
        with pytest.raises(common.DataError, match="--resume"):
            script.resolve_args(args)
    with pytest.raises(SystemExit):
        s4.main(["--data", "synthetic", "--stage", "mlmt", "--benchmark", "2"])
    assert "--stage mlmt" in capsys.readouterr().err


def test_label_transform_resamples_as_cv2_inter_nearest():
    # the discriminator's ground-truth stream scales labels as the released VOCGTDataSet: cv2.INTER_NEAREST with
    # fx = fy = f (size rounded half to even, source index floor(d / f)); PIL's NEAREST takes pixel centres instead
    big = np.random.default_rng(0).integers(0, 21, (25, 31), dtype=np.uint8)
    y = common.LabelTransform(scales=[0.5])(big, random.Random(0)).numpy()
    assert y.shape == (12, 16) and np.array_equal(y, big[::2, ::2][:12, :16])
    y = common.LabelTransform(scales=[0.5], resample="pil")(big, random.Random(0)).numpy()
    assert y.shape == (13, 16)
    y = common.LabelTransform(scales=[1.6])(big, random.Random(0)).numpy()
    assert y.shape == (40, 50) and np.array_equal(y, big[np.ix_([math.floor(d / 1.6) for d in range(40)],
                                                                  [math.floor(d / 1.6) for d in range(50)])])
    with pytest.raises(common.DataError):
        common.LabelTransform(resample="bicubic")


# ---------------------------------------------------------------------------------------------------------------
# issue 15: the miniature's pretrained start, D's depth, pictures (hung2018 and common)
# ---------------------------------------------------------------------------------------------------------------
def test_i15_pretrain_source_is_disjoint_and_deterministic():
    a, b = common.SyntheticPretrainSource(8, 80, 0), common.SyntheticPretrainSource(8, 80, 0)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert set(np.unique(a.labels)) <= set(range(common.SyntheticPretrainSource.NUM_CLASSES)) | {255}
    assert not set(common.SyntheticPretrainSource.CLASSES[1:]) & set(common.SyntheticSource.CLASSES[1:])
    c = common.SyntheticSource(size=80, num_train=8, num_val=0, seed=0)
    assert not np.array_equal(a.images[0], c.images[0])


def test_i15_hung_init_synthetic_loads_the_cached_backbone_and_keeps_the_head_fresh(tmp_path):
    out = str(tmp_path / "run")
    run_main(["--data", "synthetic", "--out", out, "--stop-at", "1"] + TINY)
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    assert args["init"] == "synthetic" and args["d_layers"] == 3
    path = common.synthetic_pretrained("hung2018-resnet18-w32-aspp1.2.3.4x4", None, None)   # exists: no build
    assert path.startswith(torch.hub.get_dir())
    cached = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    torch.manual_seed(0)
    model = DeepLabV2(6, "resnet18", (1, 2, 3, 4), 4, width=32)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    ns = hung2018.resolve_args(hung2018.get_parser().parse_args(["--data", "synthetic"]))
    hung2018.initialise(model, ns)
    own = model.state_dict()
    assert torch.equal(own["layer1.0.conv1.weight"], cached["layer1.0.conv1.weight"])
    assert not torch.equal(own["layer1.0.conv1.weight"], fresh["layer1.0.conv1.weight"])
    assert cached["layer5.conv2d_list.0.weight"].shape[0] == common.SyntheticPretrainSource.NUM_CLASSES
    assert torch.equal(own["layer5.conv2d_list.0.weight"], fresh["layer5.conv2d_list.0.weight"])   # head: fresh


def test_i15_pretraining_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    common.synthetic_pretrained("test-tiny-net", lambda c: torch.nn.Conv2d(3, c, 3, padding=1),
                                common.Normalize("imagenet"))
    assert torch.equal(torch.rand(3), expected)
    assert os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", "synthetic-pretrain-test-tiny-net-v1.pt"))


def test_i15_hung_d_layers_sets_the_receptive_field():
    x = torch.zeros(1, 6, 80, 80)
    assert FCDiscriminator(6, 16, layers=3)(x).shape[-1] == 10          # 3 stride-2 convs: 1/8, 22 px
    assert FCDiscriminator(6, 16)(x).shape[-1] == 2                     # card 4.3: 5, 1/32, 94 px
    assert set(k.split(".")[0] for k in FCDiscriminator(6, 16).state_dict()) == {
        "conv1", "conv2", "conv3", "conv4", "classifier"}                 # the paper's checkpoint names


def test_i15_curves_and_labeled_pictures(tmp_path):
    out = str(tmp_path / "run")
    run_main(["--data", "synthetic", "--out", out] + TINY)
    curves = Image.open(os.path.join(out, "curves.png"))
    assert curves.size[1] >= 4 * 150                                     # four panels
    pic = np.asarray(Image.open(os.path.join(out, "predictions.png")))
    # title strip above the images and a legend strip below them: more rows than 2 images of 240 px
    assert pic.shape[0] > 2 * 240 + 30
    assert json.loads(open(os.path.join(out, "log.jsonl")).read().splitlines()[-1])["val_miou"] >= 0

# =========================================================================================================
# issue 15: latent_classes: --init synthetic (the miniature's pretrained start), --d-layers, titled pictures, curves
# ================================================================================================================
def test_i15_latent_classes_synthetic_preset_pretrained_start_and_pictures(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = lc.main(["--data", "synthetic", "--out", str(out)] + LC_TINY)       # the preset: --init synthetic
    for name in ("curves.png", "predictions.png"):
        assert Image.open(out / name).size[0] > 0, name
    assert read_log(out)[-1] == {"iter": 4, "val_miou": metrics["miou"]}
    assert "loaded" in capsys.readouterr().out                                    # load_pretrained's match report
    D = torch.load(out / "last.pt", weights_only=True)["D"]
    assert sorted(k for k in D if k.endswith(".weight")) == ["classifier.weight", "conv1.weight", "conv2.weight"]
    # initialise() loads the cached file's backbone tensors (the tag names the network's shape) and no head
    args = lc.resolve_args(lc.get_parser().parse_args(["--data", "synthetic", "--num-latent", "5"]))
    assert args.init == "synthetic" and args.d_layers == 3
    torch.manual_seed(0)
    model = lc.DeepLabV2(6, 5, args.backbone, args.aspp_rates, args.aspp_branches,
                         stride_in_3x3=args.init == "imagenet", width=args.width)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    lc.initialise(model, args)
    path = common.synthetic_pretrained("latent_classes-resnet18-w32-aspp1.2.3.4x4", None, None)   # cached: no build
    assert os.path.isfile(path) and f"from {path}" in capsys.readouterr().out
    cached = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    own = model.state_dict()
    backbone = [k for k in own if not k.startswith(lc.HEADS)]
    assert backbone and all(torch.equal(own[k], cached[k]) for k in backbone)
    assert not torch.equal(fresh["conv1.weight"], cached["conv1.weight"])          # it did load something
    for k in own:
        if k.startswith(lc.HEADS):                                                # both heads: fresh, as built
            assert torch.equal(own[k], fresh[k]), k
    assert cached["layer5.conv2d_list.0.weight"].shape[0] == common.SyntheticPretrainSource.NUM_CLASSES != 6
    assert not torch.equal(own["layer5.conv2d_list.0.bias"], cached["layer5.conv2d_list.0.bias"][:6])


def test_i15_latent_classes_d_layers():
    parse = lambda *a: lc.resolve_args(lc.get_parser().parse_args(list(a)))
    assert parse("--data", "voc", "--init", "none").d_layers == 5                  # the paper's D (card 5.4)
    assert parse("--data", "synthetic").d_layers == 3
    assert parse("--data", "synthetic", "--d-layers", "4").d_layers == 4
    x = torch.rand(2, 6, 64, 64)
    for layers, side in ((3, 8), (5, 2)):                                          # 1/8 and 1/32 of the input
        D = lc.FCDiscriminator(6, 8, layers=layers)
        convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == layers and all(m.stride == (2, 2) and m.kernel_size == (4, 4) for m in convs)
        with torch.no_grad():
            assert D(x).shape == (2, 1, side, side)
    assert lc.FCDiscriminator(6, 8)(x).shape == (2, 1, 2, 2)                       # the default is the paper's 5
    paper = lc.FCDiscriminator(21)                                                 # checkpoint names as before
    assert [k for k in paper.state_dict() if k.endswith("weight")] == \
        ["conv1.weight", "conv2.weight", "conv3.weight", "conv4.weight", "classifier.weight"]
    assert paper.conv4.out_channels == 512 and paper.classifier.in_channels == 512

# ===============================================================================================================
# issue 15: luc2016
# ===============================================================================================================
def test_luc_synthetic_preset_pretrained_start_and_pictures(tmp_path, capsys, monkeypatch):
    paths, build = [], common.synthetic_pretrained
    monkeypatch.setattr(common, "synthetic_pretrained", lambda *a, **k: paths.append(build(*a, **k)) or paths[-1])
    out = str(tmp_path / "run")
    m = luc2016.main(["--data", "synthetic", "--out", out] + LUC_TINY)
    with open(os.path.join(out, "args.json")) as f:
        saved = json.load(f)
    assert (saved["init"], saved["adversary"], saved["adv_pools"]) == ("synthetic", "stanford", 0)
    assert "left fresh (class-specific output layer): classifier.weight (6, 384, 1, 1)" in capsys.readouterr().out
    assert os.path.basename(paths[0]) == "synthetic-pretrain-luc2016-farabet-w8-v1.pt"
    with Image.open(os.path.join(out, "predictions.png")) as im:     # 2 rows of 4 titled pictures of 240 px, legend
        assert im.width == 4 * 240 + 3 * 2 and im.height > 16 + 2 * 240 + 2
    with Image.open(os.path.join(out, "curves.png")) as im:
        assert im.size == (520, 190 * len(luc2016.CURVES))
    log = read_log(out)
    assert log[-1] == {"iter": 4, "s_updates": 4, "val_miou": m["miou"], "val_bf": m["bf_mean"]}
    for r in log[:-1]:
        assert 0 < r["a_real"] < 1 and 0 < r["a_fake"] < 1
    # the segmenter after initialisation: the cached file's tensors, except the fresh 6-class output layer
    args = luc2016.resolve_args(luc2016.get_parser().parse_args(["--data", "synthetic"]))
    torch.manual_seed(0)
    model = luc2016.make_segmenter(args, 6)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    luc2016.initialise(model, args)
    assert paths[-1] == paths[0]                                      # the same cached file
    cached = torch.load(paths[0], weights_only=True)["state_dict"]
    assert cached["classifier.weight"].shape[0] == common.SyntheticPretrainSource.NUM_CLASSES
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k] if k.startswith("classifier.") else cached[k]), k
    assert not torch.equal(fresh["conv1.weight"], cached["conv1.weight"])
    bad = luc2016.MultiScaleNet(6, 4)                                 # another width: a clear error, not a half load
    with pytest.raises(common.DataError, match="does not fit this segmenter"):
        luc2016.load_synthetic(bad, paths[0])


def _luc_fields_of_view(S, h=64):
    """Receptive field of the centre decision, in label-map cells, of (label branch, image branch): ReLUs removed,
    max-pools made average pools, all weights 1 (card 14.2's method)."""
    S = copy.deepcopy(S)
    for name in ("label_branch", "image_branch", "trunk"):
        mods = [torch.nn.AvgPool2d(2, 2) if isinstance(m, torch.nn.MaxPool2d) else m for m in getattr(S, name)
                if not isinstance(m, torch.nn.ReLU)]
        for m in mods:
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
        setattr(S, name, torch.nn.Sequential(*mods))
    p = torch.zeros(1, S.label_branch[0].in_channels, h, h, requires_grad=True)
    image = torch.zeros(1, 3, h, h, requires_grad=True)
    z = S(p, image)
    z[0, 0, z.shape[-2] // 2, z.shape[-1] // 2].backward()
    width = lambda g: len(g[0].abs().sum((0, 1)).nonzero())
    return width(p.grad), width(image.grad)


def test_luc_adversary_pools_keep_the_papers_field_of_view_ratio(tmp_path):
    paper = luc2016.StanfordAdversary(8)                              # default: supp. Fig. 1 as reconstructed
    assert [k for k in paper.state_dict() if k.startswith("trunk.")] == [
        f"trunk.{i}.{t}" for i in (0, 3, 6, 8) for t in ("weight", "bias")]   # the names of earlier checkpoints
    assert [m.out_channels for m in paper.trunk if isinstance(m, torch.nn.Conv2d)] == [128, 256, 512, 1]
    # label-map cells (x4 = input pixels): the paper's 30 (label) / 34 (image) cells = 120 / 136 px of a 320x240
    # Stanford image; on the 80 px synthetic images (20x20 cells) pools=0 sees 9 / 13 cells = 36 / 52 px
    fov = {k: _luc_fields_of_view(luc2016.StanfordAdversary(8, pools=k)) for k in (0, 1, 2)}
    assert fov == {0: (9, 13), 1: (16, 20), 2: (30, 34)}
    paper_ratio = (4 * fov[2][0] / 320, 4 * fov[2][0] / 240)                     # 38% of the width, 50% of the height
    assert paper_ratio[0] <= 4 * fov[0][0] / 80 <= paper_ratio[1] < 4 * fov[1][0] / 80 < 4 * fov[2][0] / 80
    p, im = torch.zeros(2, 8, 20, 20), torch.zeros(2, 3, 20, 20)
    assert luc2016.StanfordAdversary(8, pools=0)(p, im).shape == (2, 1, 20, 20)    # 400 decisions (paper: 300)
    assert paper(p, im).shape == (2, 1, 5, 5)
    parse = lambda *a: luc2016.resolve_args(luc2016.get_parser().parse_args(list(a)))
    assert parse("--data", "synthetic").adv_pools == 0
    assert parse("--data", "synthetic", "--adv-pools", "2").adv_pools == 2
    assert parse("--data", "stanford", "--data-root", "x").adv_pools == 2
    with pytest.raises(common.DataError, match="stanford adversarial only"):
        parse("--data", "synthetic", "--adversary", "largefov-light", "--adv-pools", "1")
    assert parse("--data", "synthetic", "--adversary", "largefov-light").adversary == "largefov-light"   # preset's 0
    # the paper's trunk trains and resumes; an args.json from before --adv-pools means the paper's trunk
    out = str(tmp_path / "two")
    assert luc2016.main(["--data", "synthetic", "--out", out, "--adv-pools", "2", "--stop-at", "2"] + LUC_TINY) is None
    assert "trunk.8.weight" in torch.load(os.path.join(out, "last.pt"), weights_only=True)["A"]
    with open(os.path.join(out, "args.json")) as f:
        saved = json.load(f)
    del saved["adv_pools"]
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(saved, f)
    m = luc2016.main(["--resume", out, "--data", "synthetic"])
    assert 0 <= m["miou"] <= 1 and [r["iter"] for r in read_log(out)] == [1, 2, 3, 4, 4]

# ===============================================================================================================
# issue 15: s4gan_mlmt
# ===============================================================================================================
def test_s4_synthetic_preset_pretrained_starts_and_pictures(tmp_path, monkeypatch):
    """The synthetic preset starts S and both MLMT classifiers from common.synthetic_pretrained's cached files: every
    backbone tensor equals the file's, the output layers are fresh; predictions.png, curves.png, curves_mlmt.png."""
    seen = {}
    initialise, make_classifier = s4.initialise, s4.make_classifier

    def spy_initialise(model, args):
        initialise(model, args)
        seen["S"] = {k: v.clone() for k, v in model.state_dict().items()}

    def spy_classifier(backbone, num_classes, init, src=None):
        net = make_classifier(backbone, num_classes, init, src)
        if init == "synthetic":
            seen.setdefault("mlmt", []).append(({k: v.clone() for k, v in net.state_dict().items()}, src))
        return net
    monkeypatch.setattr(s4, "initialise", spy_initialise)
    monkeypatch.setattr(s4, "make_classifier", spy_classifier)
    out = str(tmp_path / "run")
    m = s4.main(["--data", "synthetic", "--out", out] + S4_TINY)
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (args["init"], args["mlmt_init"], args["d_layers"]) == ("synthetic", "synthetic", 2)
    for name in ("predictions.png", "curves.png", "curves_mlmt.png"):
        assert Image.open(os.path.join(out, name)).size[0] > 200, name
    assert Image.open(os.path.join(out, "predictions.png")).size[1] > 2 * 240        # 2 rows of 240 px, titles, legend
    log = read_log(out)
    assert log[-1] == {"iter": 4, "val_miou": m["miou"], "val_miou_fused": m["fused"]["miou"]}

    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    seg_file = os.path.join(hub, "synthetic-pretrain-s4gan_mlmt-seg-resnet18-w32-aspp1.2.3.4x4-v1.pt")
    pre = torch.load(seg_file, map_location="cpu", weights_only=True)["state_dict"]
    S = seen["S"]
    backbone = [k for k in S if not k.startswith("layer5.")]
    assert backbone and all(torch.equal(S[k], pre[k]) for k in backbone)
    torch.manual_seed(0)                                          # run() builds S first after seeding with --seed 0
    fresh = s4.DeepLabV2(6, "resnet18", (1, 2, 3, 4), width=32).state_dict()
    assert pre["layer5.conv2d_list.0.weight"].shape[0] == common.SyntheticPretrainSource.NUM_CLASSES
    assert all(torch.equal(S[k], fresh[k]) for k in S if k.startswith("layer5."))   # the head: fresh, not loaded

    (student, src_s), (teacher, src_t) = seen["mlmt"]
    assert src_s == src_t == os.path.join(hub, "synthetic-pretrain-s4gan_mlmt-mlmt-resnet10-48-v1.pt")
    pre = torch.load(src_s, map_location="cpu", weights_only=True)["state_dict"]
    assert pre["fc.weight"].shape == (common.SyntheticPretrainSource.NUM_CLASSES, 512)
    body = [k for k in student if not k.startswith("fc.")]
    assert body and all(torch.equal(net[k], pre[k]) for net in (student, teacher) for k in body)
    assert student["fc.weight"].shape == teacher["fc.weight"].shape == (6, 512)
    assert not torch.equal(student["fc.weight"], teacher["fc.weight"])          # each its own fresh fc

    # the classifier's loading code refuses a file of another network, in one line
    with pytest.raises(common.DataError, match="does not fit the MLMT classifier resnet18"):
        s4.make_classifier("resnet18", 6, "synthetic", src_s)


def test_s4_d_layers_conv_count_and_receptive_field(tmp_path):
    parse = lambda *a: s4.resolve_args(s4.get_parser().parse_args(list(a)))
    assert parse("--data", "voc").d_layers == 4 and parse("--data", "synthetic").d_layers == 2
    assert parse("--data", "synthetic", "--d-layers", "3").d_layers == 3
    paper = s4.Discriminator(21)
    assert [k for k in paper.state_dict() if k.startswith("convs.")] == [
        f"convs.{i}.{p}" for i in range(4) for p in ("weight", "bias")]           # the paper's names kept
    for layers, rf in ((2, 10), (3, 22), (4, 46)):               # r(L) = 3 * 2^L - 2 (Discriminator's docstring)
        D = s4.Discriminator(21, ndf=8, layers=layers).eval()
        assert len(D.convs) == layers and D.fc.in_features == 8 * 2 ** (layers - 1)
        assert [type(d) for d in s4.Discriminator(21, 8, True, layers).drops] == \
            [torch.nn.Dropout2d] * (layers - 1) + [torch.nn.Identity]
        x = torch.rand(1, 24, 96, 96, requires_grad=True)
        h = x
        for conv in D.convs:
            h = D.leaky_relu(conv(h))
        c = h.shape[-1] // 2
        h[0, :, c, c].sum().backward()                          # one output position: its support in the input
        cols = (x.grad.abs().sum((0, 1, 2)) > 0).nonzero().flatten()
        assert cols.max() - cols.min() + 1 == len(cols) == rf, (layers, len(cols))
        z, feat = D(torch.rand(2, 24, 80, 80))
        assert z.shape == (2, 1) and feat.shape == (2, 8 * 2 ** (layers - 1))
    out = tmp_path / "r"
    s4.main(["--data", "synthetic", "--stage", "s4gan", "--out", str(out), "--d-layers", "3", "--num-pictures", "0"] +
            S4_TINY[:4] + ["--num-steps", "1"])
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["D"]
    assert sorted({k.split(".")[1] for k in state if k.startswith("convs.")}) == ["0", "1", "2"]
    assert state["fc.weight"].shape == (1, 16 * 4)                                  # ndf 16 (preset), 3 convs

# ===============================================================================================================
# issue 15: dual_disc
# ===============================================================================================================
def test_dual_disc_synthetic_init_pictures_and_final_miou(tmp_path, monkeypatch, capsys):
    """The synthetic preset starts from common.synthetic_pretrained: after initialise() every tensor of G equals the
    cached file's except the class-specific classifier (9 pretraining classes, 6 here); predictions.png has titles
    over its 7 columns and a legend; curves.png has one panel per CURVES entry; the final val mIoU ends log.jsonl."""
    paths, seen = [], {}
    pretrained, init = common.synthetic_pretrained, dd.initialise
    monkeypatch.setattr(common, "synthetic_pretrained", lambda *a, **k: paths.append(pretrained(*a, **k)) or paths[-1])
    monkeypatch.setattr(dd, "initialise", lambda model, args: (init(model, args), seen.update(
        args=args, state={k: v.clone() for k, v in model.state_dict().items()})))
    out = str(tmp_path / "run")
    m = dd.main(["--data", "synthetic", "--out", out] + DD_TINY)
    args = seen["args"]
    assert (args.init, args.d1_layers, args.d2_layers) == ("synthetic", 3, 2) and len(paths) == 1
    assert os.path.basename(paths[0]).startswith("synthetic-pretrain-dual_disc-resnet14-wpg16-")
    cached = torch.load(paths[0], map_location="cpu", weights_only=True)["state_dict"]
    state = seen["state"]
    assert set(cached) == set(state)
    for k, v in state.items():
        if k.startswith("classifier."):                  # fresh: another number of classes
            assert cached[k].shape[0] == common.SyntheticPretrainSource.NUM_CLASSES and v.shape[0] == 6, k
        else:
            assert torch.equal(v, cached[k]), k
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("loaded ")]
    assert len(report) == 1 and "backbone 102/102, ASPP 36/36, decoder 18/18" in report[0]
    assert "not loaded: classifier.bias, classifier.weight" in report[0]
    with Image.open(os.path.join(out, "predictions.png")) as im:    # 7 columns of 240 px, 2 gaps of 2 px between
        assert im.size[0] == 7 * 242 - 2 and im.size[1] > 16 + 2 * 240
        top = np.asarray(im.convert("L"))[:14]
        assert (top < 128).any()                                     # titles drawn above the columns
    with Image.open(os.path.join(out, "curves.png")) as im:
        assert im.size[1] == 190 * len(dd.CURVES)
    log = read_log(out)
    assert log[-1] == {"iter": 4, "val_miou": m["miou"]} and [r["iter"] for r in log[:-1]] == [1, 2, 3, 4]
    keys = {k for _, ks, _ in dd.CURVES for k in ks}
    assert {k for r in log for k in r} - {"iter", "img_per_s", "lr", "peak_mem_gib"} <= keys   # all logged, plotted
    assert set(dd.LOG_KEYS) | {"val_miou"} == keys


def test_dual_disc_init_synthetic_rejects_another_shape(monkeypatch):
    """The synthetic file goes through load_pretrained's checks: a network of another shape is a one-line error."""
    paths, pretrained = [], common.synthetic_pretrained
    monkeypatch.setattr(common, "synthetic_pretrained", lambda *a, **k: paths.append(pretrained(*a, **k)) or paths[-1])
    args = dd.resolve_args(dd.get_parser().parse_args(["--data", "synthetic"]))
    dd.initialise(dd.DeepLabV3Plus(6, "resnet14", 16, 16, (1, 2, 3), 64, 16, 64), args)       # the preset's shape
    state = torch.load(paths[0], map_location="cpu", weights_only=True)
    with pytest.raises(common.DataError, match="is not a DeepLab-v3\\+ of this shape"):
        dd.load_pretrained(dd.DeepLabV3Plus(6, "resnet14", 16, 16, (1, 2, 3), 32, 16, 64), state, paths[0])


def _stride2_convs(m):
    return sum(isinstance(c, torch.nn.Conv2d) and c.stride == (2, 2) for c in m.modules())


def test_dual_disc_depth_flags_change_the_conv_counts():
    parse = lambda *a: dd.resolve_args(dd.get_parser().parse_args(["--ndf", "4"] + list(a)))
    for argv, n1, n2 in ((["--data", "voc"], 5, 4), (["--data", "synthetic"], 3, 2),
                         (["--data", "voc", "--d1-layers", "3", "--d2-layers", "2"], 3, 2),
                         (["--data", "synthetic", "--d1-layers", "4", "--d2-layers", "3"], 4, 3)):
        args = parse(*argv)
        assert (args.d1_layers, args.d2_layers) == (n1, n2)
        D = dd.build_discriminators(6, args)
        assert _stride2_convs(D["d1"]) == n1 and _stride2_convs(D["hung"]) == n1 and _stride2_convs(D["d2"]) == n2
        assert len(D["d1"].trunk) == n1 - 1 and [f"e{k}" for k in range(1, n2 + 1)] == \
               [n for n, _ in D["d2"].named_children() if n.startswith("e")]
    fc = dd.build_discriminators(6, parse("--data", "synthetic", "--d1-head", "fc"))["d1"]
    assert _stride2_convs(fc) == 2 and isinstance(fc.classifier, torch.nn.Linear)          # the linear takes its place
    for structure, n, names in (("s3", 4, {"d3", "d2", "d1"}), ("s3", 2, {"d1"}), ("s2", 3, set())):
        D2 = dd.PixelDiscriminator(6, ndf=4, structure=structure, layers=n)
        assert {k for k, _ in D2.named_children() if k[0] == "d"} == names
        assert D2(torch.rand(1, 6, 80, 80)).shape == (1, 1, 80, 80)
    # the paper's depth keeps the checkpoint names of before the flags
    paper = dd.build_discriminators(6, parse("--data", "voc")).state_dict()
    for k in ("d1.trunk.3.0.weight", "d1.classifier.weight", "d2.e4.0.weight", "d2.skip.0.weight",
              "d2.decoder.1.0.weight", "d2.classifier.weight", "hung.net.4.weight"):
        assert k in paper, k
    assert not any(k.startswith(("d1.trunk.4", "d2.e5", "hung.net.5")) for k in paper)
    with pytest.raises(SystemExit):
        dd.get_parser().parse_args(["--data", "synthetic", "--d2-layers", "1"])


def _receptive_field(net, out_module, size, in_channels=6):
    """Largest width, in input pixels, that one output of `out_module` sees (gradient of that output), over a few
    central positions; all weights positive so that nothing cancels."""
    net = copy.deepcopy(net).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.abs() + 1e-3)
    got = {}
    out_module = dict(net.named_modules())[out_module]
    out_module.register_forward_hook(lambda m, i, o: got.__setitem__("o", o))
    best = 0
    for dc in range(-4, 4):
        x = torch.rand(1, in_channels, size, size, dtype=torch.float64, requires_grad=True)
        net(x)
        o = got["o"]
        o[0, 0, o.shape[2] // 2, o.shape[3] // 2 + dc].backward()
        cols = torch.nonzero(x.grad[0].abs().sum((0, 1)) > 0)[:, 0]
        best = max(best, int(cols.max() - cols.min() + 1))
    return best


# s3 on 321 px: 106 by the comment's sum; measured, the field covers whole e4 cells (16 px), 94 or 110 by position
@pytest.mark.parametrize("which,size,layers,expected", [
    ("d1", 321, 5, 94), ("d1", 80, 3, 22), ("hung", 80, 3, 22),
    ("s4", 321, 4, 78), ("s4", 80, 2, 26), ("s4", 80, 3, 46), ("s1", 321, 4, 78), ("s1", 80, 2, 18),
    ("s2", 321, 4, 34), ("s2", 80, 2, 18), ("s3", 321, 4, 110), ("s3", 80, 2, 22)])
def test_dual_disc_receptive_fields_as_the_comment_computes(which, size, layers, expected):
    """The numbers of the receptive-field comment above the discriminators, measured: the synthetic preset's depths
    keep the paper's ratio to the crop (D1 94/321 -> 22/80; D2 s4 78/321 -> 26/80)."""
    if which == "d1":
        net, out = dd.ImageDiscriminator(6, ndf=2, layers=layers), "classifier"
    elif which == "hung":
        net, out = dd.FCDiscriminator(6, ndf=2, layers=layers), f"net.{layers - 1}"
    else:
        net, out = dd.PixelDiscriminator(6, ndf=4, structure=which, layers=layers), "classifier"
    assert _receptive_field(net, out, size) == expected


# ---------------------------------------------------------------------------------------------------------------
# issue 15, hypothesis 3: results/synthetic_table.py's probe of a finished run and its data statistics
# ---------------------------------------------------------------------------------------------------------------
def _synthetic_table():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "synthetic_table.py")
    spec = importlib.util.spec_from_file_location("synthetic_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_i15_probe_agrees_with_the_scripts_own_evaluation(tmp_path):
    table = _synthetic_table()
    out = str(tmp_path / "run")
    metrics = run_main(["--data", "synthetic", "--out", out] + TINY)
    r = table.probe(out, 1000)
    assert r["unlabeled"]["images"] == 875 and r["val"]["images"] == 200
    val = r["val"]
    # the probe rebuilds the network from args.json and last.pt: on val it must see what the script saw
    assert val["pixel_acc"] == pytest.approx(metrics["pixel_acc"], abs=1e-9)
    assert val["miou"] == pytest.approx(metrics["miou"], abs=1e-9)
    for part in r.values():
        assert sum(part["share_by_decile"]) == pytest.approx(1, abs=1e-3)
        assert sum(s * (a or 0) for s, a in zip(part["share_by_decile"], part["acc_by_decile"])) == \
            pytest.approx(part["pixel_acc"], abs=2e-3)
        for row in part["confusion_rows"]:
            assert sum(row) == pytest.approx(1, abs=1e-3)
        # the full method (L_semi on): kept and dropped pixels together give the pixel accuracy
        k = part["semi_kept"]
        assert 0 <= k <= 1
        assert k * (part["acc_kept"] or 0) + (1 - k) * (part["acc_dropped"] or 0) == \
            pytest.approx(part["pixel_acc"], abs=1e-6)
    # the pool size comes from the run folder (what --hypothesis3 writes there) when it is not given
    with open(os.path.join(out, "synthetic_size.json"), "w") as f:
        json.dump({"num_train": 1000}, f)
    assert table.probe(out)["val"] == val
    sup = str(tmp_path / "sup")
    run_main(["--data", "synthetic", "--out", sup, "--lambda-adv", "0", "--lambda-adv-unl", "0", "--lambda-semi", "0"]
             + TINY)
    assert "semi_kept" not in table.probe(sup, 1000)["val"]        # a baseline has no T_semi selection to report
    os.remove(os.path.join(sup, "last.pt"))
    with pytest.raises(SystemExit, match="not a finished hung2018"):  # nothing to probe: one line, no traceback
        table.probe(sup)


def test_i15_data_stats_of_the_miniature():
    d = _synthetic_table().data_stats()
    assert d["images"] == 1000 and d["pixels_per_image"] == 80 * 80
    assert sum(d["pixel_share"].values()) + d["ignore_share"] == pytest.approx(1)
    assert 0 < d["ignore_share"] < 0.1
    assert 1 <= d["object_classes_per_image"] <= 3                  # 2-3 objects per image, classes may repeat
    assert set(d["images_per_class"]) == set(common.SyntheticSource.CLASSES[1:])
