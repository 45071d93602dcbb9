"""Starting from released backbones (issue 41): every timm ViT family (plain, layer scale, registers, RoPE) trains
from a saved timm state dict and exports a model timm loads strictly by its name; loading says what it did and
takes the heads a file has; the head warm-up keeps the backbone exactly; layer-wise lr decay; Gram anchoring
against a float64 loop reference; the starting model's row beside the result."""

import json
import logging
import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from test_train import build_parts, tiny_config

from pwself.cli import main
from pwself.config import ConfigError, load_config
from pwself.init_weights import load_start
from pwself.losses import gram_loss
from pwself.models import DistillNet, forward_tokens, make_vit
from pwself.run.checkpoint import load_checkpoint
from pwself.schedules import apply_schedules, make_schedules
from pwself.step import build_step, param_groups

SHRINK = {"embed_dim": 32, "depth": 2, "num_heads": 2}
MODEL_ARGS = "backbone.model_args={embed_dim: 32, depth: 2, num_heads: 2}"
# name -> (global side, local side): multiples of the family's patch
FAMILIES = {"vit_small_patch16_224": (32, 16), "vit_small_patch14_dinov2": (28, 14),
            "vit_small_patch14_reg4_dinov2": (28, 14), "vit_small_patch16_dinov3": (32, 16)}
TINY = ["data.kind=synthetic", "data.synthetic_size=64", "views.n_local=2", "head.out_dim=16", "head.hidden_dim=32",
        "head.bottleneck_dim=16", "log_every=1", "eval.knn_floors=false"]


def released_file(tmp_path, name, in_chans=3, **over):
    """A stand-in for a released checkpoint: timm's model for ``name``, shrunk, saved as a timm state dict at
    timm's own default input size (its position embedding on another grid than the run's)."""
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **{**SHRINK, **over})
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def sizes(name):
    g, loc = FAMILIES[name]
    return [f"views.global_size={g}", f"views.local_size={loc}"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_trains_two_steps_from_a_timm_file_and_exports_what_timm_loads_strictly(name, tmp_path, caplog):
    path = released_file(tmp_path, name)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="pwself")
    assert main(["pretrain", "--out-dir", str(out), "--batch-size", "32", "--epochs", "1", "--no-progress", *TINY,
                 *sizes(name), f"backbone.name={name}", MODEL_ARGS, f"backbone.init={path}", "backbone.in_chans=3",
                 "loss.objective=ibot"]) == 0
    said = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    n_file = len(load_file(str(path)))
    assert said.startswith(f"loaded {n_file} tensors from {path}") and "new DINO head" in said
    if "reg4" in name:
        assert "4 registers" in said and "layer scale" in said
    if "dinov3" in name:
        assert "RoPE" in said and "pos_embed" not in said
    else:
        assert "pos_embed" in said  # timm's default grid -> the run's
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    assert main(["export", str(out), "--format", "folder", str(tmp_path / "model"), "--heads"]) == 0
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["architecture"] == name and "hf_hub_id" not in cfg["pretrained_cfg"]
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "model" / "model.safetensors")), **cfg["model_args"]).eval()  # strict by default
    teacher = load_checkpoint(out)["teacher"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, teacher[f"backbone.{k}"]), k
    x = torch.rand(2, 3, *[FAMILIES[name][0]] * 2)
    import pwself

    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), pwself.load(tmp_path / "model").forward_features(x))
    # The export's heads continue the training: a run started from the folder takes them.
    heads = load_file(str(tmp_path / "model" / "heads.safetensors"))
    assert set(heads) >= {"head.mlp.0.weight", "mask_token"}
    net = DistillNet(load_config(None, [*TINY, *sizes(name), f"backbone.name={name}", MODEL_ARGS,
                                        "backbone.in_chans=3"]).backbone,
                     load_config(None, TINY).head, FAMILIES[name][0], mask_token=True)
    line = load_start(net, tmp_path / "model")
    assert "DINO head from the file" in line and "mask token from the file" in line
    assert torch.equal(net.head.mlp[0].weight, heads["head.mlp.0.weight"])
    assert torch.equal(net.mask_token, heads["mask_token"])


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_the_float64_position_embedding_is_timms(name):
    """pwself resamples a float64 position embedding in float64 (portable golden runs): the same tokens as timm's
    float32 resampling, for class-token and register layouts alike, at another view size."""
    cfg = load_config(None, [*TINY, *sizes(name), f"backbone.name={name}", MODEL_ARGS]).backbone
    torch.manual_seed(0)
    vit = make_vit(cfg, 28)
    ref = timm.create_model(name, pretrained=False, num_classes=0, img_size=28, in_chans=1, dynamic_img_size=True,
                            **SHRINK)
    ref.load_state_dict(vit.state_dict())
    x = torch.rand(2, 1, 42, 56, dtype=torch.float64)
    with torch.no_grad():
        got = forward_tokens(vit.double(), x)
        want = ref.eval().double().forward_features(x)
    torch.testing.assert_close(got.patches, want[:, ref.num_prefix_tokens:], rtol=1e-5, atol=1e-5)
    assert got.grid == (3, 4) and got.patches.shape[1] == 12  # the prefix tokens (CLS, registers) stay out


def test_names_and_arguments_that_cannot_be_a_backbone_are_one_line_errors():
    with pytest.raises(ConfigError, match="not a timm ViT with a class token"):
        load_config(None, ["backbone.name=resnet18"])
    with pytest.raises(ConfigError, match="needs backbone.name"):
        load_config(None, [MODEL_ARGS])
    with pytest.raises(ConfigError, match="sets img_size, which pwself sets itself"):
        load_config(None, ["backbone.name=vit_small_patch16_224", "backbone.model_args={img_size: 64}"])
    with pytest.raises(ConfigError, match="does not fit vit_small_patch16_224"):
        load_config(None, ["backbone.name=vit_small_patch16_224", "backbone.model_args={not_an_argument: 1}"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(None, ["backbone.name=vit_small_patch16_224", "backbone.model_args=3"])


def test_a_file_with_registers_into_a_plain_vit_names_the_family(tmp_path):
    path = released_file(tmp_path, "vit_small_patch14_reg4_dinov2", in_chans=1)
    cfg = tiny_config(**{"backbone.patch_size": 7, "views.global_size": 14, "views.local_size": 7,
                         "backbone.embed_dim": 32, "backbone.num_heads": 2, "backbone.init": str(path)})
    with pytest.raises(Exception, match="set backbone.name to its architecture, e.g. vit_small_patch14_reg4_dinov2"):
        build_step(cfg, torch.device("cpu"), [0.5], [0.25])


def _dino_state(net):
    """A file as DINO and dinov2 write theirs: the teacher under "teacher", torch's old weight_norm names, dinov2's
    head names, the mask token in the backbone."""
    state = {}
    for k, v in net.state_dict().items():
        k = k.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
        k = k.replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v")
        if k.startswith("patch_head."):
            k = "ibot_head." + k.removeprefix("patch_head.")
        elif k.startswith("head."):
            k = "dino_head." + k.removeprefix("head.")
        state["module." + ("backbone.mask_token" if k == "mask_token" else k)] = v.clone()
    return {"teacher": state}


def test_dino_and_dinov2_files_start_the_heads_and_the_mask_token(tmp_path):
    cfg = tiny_config(**{"loss.objective": "ibot", "head.patch_head": "separate"})
    torch.manual_seed(5)
    source = DistillNet(cfg.backbone, cfg.head, 16, mask_token=True)
    with torch.no_grad():
        source.mask_token.normal_()
    torch.save(_dino_state(source), tmp_path / "dinov2.pth")
    torch.manual_seed(6)
    net = DistillNet(cfg.backbone, cfg.head, 16, mask_token=True)
    line = load_start(net, tmp_path / "dinov2.pth")
    assert "DINO head from the file; patch head from the file; mask token from the file" in line
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    # A head of other sizes is not forced in: new, and said.
    other = tiny_config(**{"head.out_dim": 9})
    net = DistillNet(other.backbone, other.head, 16)
    assert "DINO head in the file does not fit this run's head (7 outputs): new DINO head" in load_start(
        net, tmp_path / "dinov2.pth")


def test_the_head_warm_up_keeps_the_backbone_exactly_then_lets_it_learn(tmp_path):
    torch.manual_seed(0)
    start = make_vit(tiny_config().backbone, 16)
    save_file(start.state_dict(), str(tmp_path / "start.safetensors"))
    cfg = tiny_config(**{"backbone.init": str(tmp_path / "start.safetensors"), "optim.head_warmup_epochs": 0.5,
                         "optim.warmup_epochs": 0, "optim.freeze_last_layer_epochs": 0, "batch_size": 8})
    step = build_step(cfg, torch.device("cpu"), [0.5], [0.25])
    sch = make_schedules(cfg, steps_per_epoch=6)
    assert sch.backbone_on == [False] * 3 + [True] * (6 * cfg.epochs - 3)
    head0 = step.model.head.mlp[0].weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for i in range(3):
        apply_schedules(step.optimizer, sch, i)
        step(images, sch.teacher_temp[i], sch.momentum[i], gen)
    for k, v in start.state_dict().items():
        assert torch.equal(step.model.backbone.state_dict()[k], v), k  # the student's, bit for bit
        # The teacher's EMA of two equal tensors, m * x + (1 - m) * x, is x up to float32 rounding.
        torch.testing.assert_close(step.teacher.backbone.state_dict()[k], v, rtol=1e-6, atol=1e-9)
    assert not torch.equal(step.model.head.mlp[0].weight, head0)  # the heads learned
    assert not torch.equal(step.teacher.head.mlp[0].weight, head0)  # and the teacher's heads follow them
    apply_schedules(step.optimizer, sch, 3)
    step(images, sch.teacher_temp[3], sch.momentum[3], gen)
    assert not torch.equal(step.model.backbone.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)


def test_layer_wise_lr_decay_gives_each_block_its_rate():
    cfg = tiny_config(**{"optim.layer_decay": 0.5, "optim.warmup_epochs": 0})
    student, _, _ = build_parts(cfg)
    opt = torch.optim.AdamW(param_groups(student.named_parameters(), split_backbone=True, layer_decay=0.5, depth=2))
    sch = make_schedules(cfg, steps_per_epoch=4)
    apply_schedules(opt, sch, 0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(student.named_parameters())
    base = sch.lr[0]
    # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm and heads 1 (BEiT / dinov2 fine-tuning)
    assert lr_of[id(named["backbone.patch_embed.proj.weight"])] == pytest.approx(base / 8)
    assert lr_of[id(named["backbone.cls_token"])] == pytest.approx(base / 8)
    assert lr_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == pytest.approx(base / 4)
    assert lr_of[id(named["backbone.blocks.1.mlp.fc2.bias"])] == pytest.approx(base / 2)
    assert lr_of[id(named["backbone.norm.weight"])] == pytest.approx(base)
    assert lr_of[id(named["head.mlp.0.weight"])] == pytest.approx(base)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in student.parameters())


def reference_gram(student, anchor):
    """Gram anchoring written out: per image, per pair of patches, (cos_s(i, j) - cos_a(i, j))^2, averaged."""
    total, count = 0.0, 0
    for s, a in zip(student.tolist(), anchor.tolist()):
        unit = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in (s)]
        unit_a = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in (a)]
        for i in range(len(s)):
            for j in range(len(s)):
                cs = sum(x * y for x, y in zip(unit[i], unit[j]))
                ca = sum(x * y for x, y in zip(unit_a[i], unit_a[j]))
                total += (cs - ca) ** 2
                count += 1
    return total / count


def test_gram_loss_equals_the_loop_reference_and_leaves_the_anchor_alone():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    loss = gram_loss(s, a)
    assert float(loss.detach()) == pytest.approx(reference_gram(s.detach(), a.detach()), rel=1e-12)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and a.grad is None


def test_gram_anchoring_is_zero_at_the_start_and_counts_in_the_loss(tmp_path):
    torch.manual_seed(0)
    save_file(make_vit(tiny_config().backbone, 16).state_dict(), str(tmp_path / "start.safetensors"))
    cfg = tiny_config(**{"backbone.init": str(tmp_path / "start.safetensors"), "loss.gram_weight": 2.0,
                         "loss.objective": "dino", "precision": "fp64", "batch_size": 4})
    step = build_step(cfg, torch.device("cpu"), [0.5], [0.25])
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, _ = step(images, 0.04, 0.9, gen)
    assert float(out.terms["gram"]) == 0.0  # the student is the anchor at the first step
    out = step.forward(images, 0.04, gen)
    assert float(out.terms["gram"]) > 0
    total = float(out.terms["cls"]) + 2.0 * float(out.terms["gram"])
    assert float(out.terms["loss"].detach()) == pytest.approx(total, rel=1e-12)
    with pytest.raises(ConfigError, match="loss.gram_weight=1.0 anchors to the starting model: set backbone.init"):
        tiny_config(**{"loss.gram_weight": 1.0})


@pytest.mark.slow
def test_a_gram_anchored_run_with_a_head_warm_up_resumes_exactly_and_reports_the_starting_model(tmp_path,
                                                                                              fake_fmnist):
    from pwself.data.scenes import SceneSpec, make_scenes

    scenes = tmp_path / "scenes"
    make_scenes(scenes, SceneSpec(size=28, n_train=24, n_test=8, item_size=(8, 14)), str(fake_fmnist),
                progress=False)
    name = "vit_small_patch14_reg4_dinov2"
    path = released_file(tmp_path, name, in_chans=1)
    out = tmp_path / "run"
    args = ["pretrain", "--out-dir", str(out), "--batch-size", "16", "--epochs", "2", "--no-progress", *TINY,
            *sizes(name), f"backbone.name={name}", MODEL_ARGS, f"backbone.init={path}", "eval.knn_floors=true",
            "optim.head_warmup_epochs=1", "loss.gram_weight=1.0", "keep_checkpoints=5", f"eval.dense_data={scenes}",
            "eval.dense_every_epochs=2"]
    assert main(args) == 0
    straight = load_checkpoint(out / "checkpoint_00000008.pt")
    floors = json.loads((out / "floors.json").read_text())
    assert {"knn10", "knn20", "miou"} <= set(floors["start"])
    report = (out / "report.md").read_text()
    assert "*starting model (backbone.init)*" in report  # kNN: what was kept
    assert f"| *starting model (backbone.init)* | 0 | {floors['start']['miou']:.2f} |" in report  # dense
    (out / "checkpoint_00000008.pt").unlink()
    (out / "checkpoint_last.pt").unlink(missing_ok=True)
    assert main([*args, "--resume"]) == 0
    resumed = load_checkpoint(out / "checkpoint_00000008.pt")
    for key in ("student", "teacher", "anchor"):
        for k, v in straight[key].items():
            assert torch.equal(v, resumed[key][k]), (key, k)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("gram" in r for r in rows) and rows[0]["gram"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name,patch", [("vit_small_patch14_reg4_dinov2", 14), ("vit_small_patch16_dinov3", 16)])
def test_full_size_released_architectures_take_two_steps_at_112_px(name, patch, tmp_path):
    """The real ViT-S/14-reg4 and ViT-S/16 dinov3 (timm's default sizes, 518 / 256 px files), post-trained at 112 px."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    path = tmp_path / "vits.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "posttrain_vit_small", "--out-dir", str(out), "--batch-size", "2",
                 "--epochs", "1", "--no-progress", "data.kind=synthetic", "data.synthetic_size=4", "data.num_workers=0",
                 f"backbone.name={name}", f"backbone.init={path}", "views.global_size=112",
                 f"views.local_size={patch * 3}", "views.n_local=2", "head.out_dim=256", "head.hidden_dim=256",
                 "backbone.in_chans=1", "data.mean=[]", "data.std=[]", "precision=fp32", "device=cpu",
                 "eval.knn_at_end=false", "log_every=1"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_attention_maps_of_every_family_are_the_blocks_own(name):
    """cls_attention reads the last block's softmax (RoPE applied where the model has it): rows over the patch
    cells, without the prefix tokens; for the plain ViT, the softmax of q·k written out."""
    from pwself.viz import cls_attention

    cfg = load_config(None, [*TINY, *sizes(name), f"backbone.name={name}", MODEL_ARGS]).backbone
    torch.manual_seed(0)
    vit = make_vit(cfg, FAMILIES[name][0]).eval()
    x = torch.randn(2, 1, FAMILIES[name][0], 2 * FAMILIES[name][0])
    att = cls_attention(vit, x)
    rows = FAMILIES[name][0] // cfg.patch_size
    assert att.shape == (2, 2, rows, 2 * rows)
    s = att.sum((-2, -1))
    assert (s > 0).all() and (s < 1).all()
    if name == "vit_small_patch16_224":
        block, captured = vit.blocks[-1], {}
        handle = block.norm1.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
        with torch.no_grad():
            vit.forward_features(x)
            handle.remove()
            h = captured["h"]
            q, k, _ = block.attn.qkv(h).reshape(2, h.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
            a = ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        torch.testing.assert_close(att, a[:, :, 0, 1:].reshape(2, 2, rows, 2 * rows))
