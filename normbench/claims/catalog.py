"""Every claim the suite tests, as data: the sentence, its source, the runs (an experiment preset), the
comparisons its verdict rests on, and the published anchor to show beside it.

A `Check` is one comparison: the runs' metric at level `a` of a factor minus at level `b`, in the runs
that match `where`; or (factor ``metric``) metric `a` minus metric `b` of the same runs; or (factor
``value``) metric `a` minus the constant `b`; or (factor ``cells``) the runs matching the settings `a` minus
those matching `b`, two cells that differ in more than one setting. `expect` says what the claim predicts:

* ``>`` / ``<``: a above / below b;
* ``=``: a equals b within `margin` (0: exactly, in every seed);
* ``not_below``: a is not lower than b by more than `margin` ("LN does not lose accuracy at batch 2").

Nothing here is decided in advance: `judge.py` computes each check's interval and test from the runs and
the verdict from those. Small-scale presets are ``normbench/conf/experiment/claims/<id>.yaml``; they share
one folder (``results/claims``) and one training budget, so a run two claims need is trained once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from normbench.errors import UserError

EXPECTATIONS = (">", "<", "=", "not_below")


@dataclass(frozen=True)
class Check:
    factor: str  # a runs-table column ('batch_size', 'norm', 'config.lr', ...), or 'metric', 'value', 'cells'
    a: object
    b: object
    expect: str
    metric: str = "test_acc"
    where: dict = field(default_factory=dict)
    margin: float = 0.0
    paired: bool = False  # runs paired by seed (the same initialization and data order at both levels)
    says: str = ""  # the comparison in words, for the report

    def __post_init__(self):
        if self.expect not in EXPECTATIONS:
            raise ValueError(f"expect must be one of {EXPECTATIONS}, got {self.expect!r}")


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    source: str
    checks: tuple[Check, ...]
    anchor: str  # the published numbers or figure to compare with
    setup: str  # what the small-scale runs are, in a sentence
    paper: tuple[str, ...] = ()  # overrides that turn the small-scale preset into the paper-scale one
    paper_setup: str = ""

    @property
    def preset(self) -> str:
        return f"claims/{self.id}"


SHIFT = "contrast:0.5"
# Paper-scale overrides and their description, as Claim's last two fields: ResNet-20 on CIFAR-10, and at width 32
# where GN runs (its default 32 groups must divide the 16 channels of a width-16 first stage).
_CIFAR = ("data=cifar10", "model=resnet20", "epochs=30", "data.train_size=null", "data.test_size=null")
RESNET_PAPER = (_CIFAR, "ResNet-20 on CIFAR-10, 30 epochs")
RESNET_GN_PAPER = ((*_CIFAR, "model.width=32"),
                   "ResNet-20 (width 32: 32 groups divide every layer) on CIFAR-10, 30 epochs")

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "bn_batch", "BN loses accuracy as the batch shrinks; LN and GN do not.",
        "Wu & He 2018 (Group Normalization), Fig. 1 and Table 2; Ba et al. 2016 (Layer Normalization), Fig. 6",
        (Check("batch_size", 128, 2, ">", where={"norm": "bn"}, says="bn: batch 128 minus batch 2"),
         Check("batch_size", 2, 128, "not_below", where={"norm": "ln"}, margin=1.0, says="ln: batch 2 minus batch 128"),
         Check("batch_size", 2, 128, "not_below", where={"norm": "gn"}, margin=1.0,
               says="gn: batch 2 minus batch 128")),
        "GN paper, ResNet-50 on ImageNet, error (%) at 32 → 2 images per GPU: BN 23.6 → 34.7, GN 24.1 → 24.1.",
        "MLP on the MNIST stand-in, bn/ln/gn at batch 2 and 128, lr scaled linearly with the batch.",
        ("data=cifar10", "model=resnet20", "model.width=32", "epochs=30", "data.train_size=null",
         "data.test_size=null", "data.augment=true"),
        "ResNet-20 (width 32: 32 groups divide every layer) on CIFAR-10, 30 epochs, augmentation"),
    Claim(
        "norm_batch", "BN's small-batch loss comes from its statistics, not from the step count or the learning "
        "rate: shrinking only the normalization batch at a fixed SGD batch reproduces it.",
        "Wu & Johnson 2021 (Rethinking 'batch' in BatchNorm), §3; Yan et al. 2020 (MABN)",
        (Check("config.norm_batch_size", 64, 2, ">", where={"norm": "bn"}, paired=True,
               says="bn at SGD batch 64: statistics over 64 minus over 2"),),
        "Wu & Johnson 2021: at a fixed SGD batch, ImageNet error rises as the normalization batch shrinks "
        "below about 16.",
        "MLP on the MNIST stand-in, bn, SGD batch 64, statistics over sub-batches of 2 or 64 (ghost BN).",
        *RESNET_PAPER),
    Claim(
        "bn_eval", "At small batch BN's population statistics misrepresent what it trained with: statistics "
        "recomputed after training beat the running averages, and a test batch's own statistics do worse.",
        "Wu & Johnson 2021 (Rethinking 'batch' in BatchNorm), §4 (PreciseBN) and §5",
        (Check("metric", "test_acc_precise", "test_acc", ">", where={"norm": "bn", "batch_size": 2},
               says="bn at batch 2: recomputed statistics minus running averages"),
         Check("metric", "test_acc_batch_stats", "test_acc_precise", "<", where={"norm": "bn", "batch_size": 2},
               says="bn at batch 2: test batch's own statistics minus recomputed ones")),
        "Wu & Johnson 2021: PreciseBN improves small-batch and large-momentum BN by up to several points.",
        "The bn_batch claim's MLP runs with bn at batch 2, each evaluated three ways.",
        *RESNET_PAPER),
    Claim(
        "rnn_stats", "Recurrent BN needs per-time-step statistics: per-step statistics beat statistics shared "
        "over time.",
        "Cooijmans et al. 2016 (Recurrent Batch Normalization), §4 and Table 1",
        (Check("config.norm.recurrent_stats", "per_step", "shared", ">", where={"norm": "bn"}, paired=True,
               says="bn-LSTM, running averages: per-step minus shared statistics"),
         Check("config.norm.recurrent_stats", "per_step", "shared", ">", where={"norm": "bn"}, paired=True,
               metric="test_acc_precise", says="bn-LSTM, statistics recomputed after training: per-step minus shared")),
        "Cooijmans et al. 2016, Table 1: sequential MNIST, BN-LSTM 99.0% vs LSTM 98.9%; statistics shared "
        "over time degrade training badly.",
        "LSTM (hidden 64) over the 28 rows of the MNIST stand-in, bn per step vs shared, batch 32.",
        ("epochs=10", "data.train_size=null", "data.test_size=null", "model.hidden_size=128"),
        "LSTM hidden 128, full MNIST rows, 10 epochs"),
    Claim(
        "ln_online", "LN works in the online regime: at batch 1 it trains as well as at large batch, where BN "
        "cannot run at all.",
        "Ba et al. 2016 (Layer Normalization), §3 and §6",
        (Check("batch_size", 1, 128, "not_below", where={"norm": "ln"}, margin=1.0,
               says="ln: batch 1 minus batch 128"),),
        "Ba et al. 2016: LN's normalization terms do not depend on the batch, so it applies at batch 1; "
        "the paper's Fig. 6 shows it robust to the batch size.",
        "MLP on the MNIST stand-in, ln at batch 1 and 128 (bn refuses batch 1 in training).",
        ("data.train_size=null", "data.test_size=null", "epochs=5"), "MLP on full MNIST, 5 epochs"),
    Claim(
        "position", "The norm goes before the activation: conv → norm → ReLU beats conv → ReLU → norm.",
        "Ioffe & Szegedy 2015, §3.2 (BN before the nonlinearity); common practice",
        (Check("config.norm.position", "pre_act", "post_act", ">", where={"norm": "bn"}, paired=True,
               says="bn: before minus after the ReLU"),
         Check("config.norm.position", "pre_act", "post_act", ">", where={"norm": "gn"}, paired=True,
               says="gn: before minus after the ReLU")),
        "No controlled published number; Ioffe & Szegedy argue for pre-activation normalization, and later "
        "work reports mixed results.",
        "The small CNN on the MNIST stand-in, bn and gn, before or after the ReLU, batch 32.",
        *RESNET_GN_PAPER),
    Claim(
        "gn_bridge", "GN bridges LN and IN: one group gives LN's outputs and one group per channel IN's.",
        "Wu & He 2018 (Group Normalization), §3.1 and Table 3",
        (Check("norm", "gn(num_groups=1)", "ln", "=", paired=True, says="gn with 1 group minus ln (exactly equal?)"),
         Check("norm", "gn(num_groups=16)", "in", "=", paired=True, margin=1.0,
               says="gn with 16 groups (one per channel) minus in")),
        "GN paper Table 3, ResNet-50 ImageNet error by groups: G=1 (LN) 25.6 ... G=32 24.1 ... 1 channel per "
        "group (IN-like) 28.4 and more.",
        "The CNN with 16 channels per stage on the MNIST stand-in: gn with 1, 4 and 16 groups, ln and in.",
        ("data=cifar10", "epochs=30", "data.train_size=null", "data.test_size=null", "data.augment=true"),
        "The same CNN (16 channels per stage, so 16 groups is one per channel) on CIFAR-10, 30 epochs"),
    Claim(
        "bn_lr", "BN tolerates higher learning rates: at a learning rate where the plain network fails, the BN "
        "network still trains.",
        "Ioffe & Szegedy 2015, §3.3; Santurkar et al. 2018, §1",
        (Check("norm", "bn", "none", ">", metric="test_acc_or_chance", where={"config.lr": 0.8},
               says="at lr 0.8: bn minus none (a diverged run counts as chance)"),),
        "Ioffe & Szegedy 2015: BN-Inception trained with a 5x and 30x larger learning rate than Inception.",
        "MLP on the MNIST stand-in, bn and none, base lr 0.05 and 0.8, batch 32 (the lr-0.05 runs show what each "
        "reaches at a comfortable learning rate).",
        ("data.train_size=null", "data.test_size=null", "epochs=5"), "MLP on full MNIST, 5 epochs"),
    Claim(
        "bn_regularizes", "BN's batch noise regularizes: a smaller generalization gap (train minus test "
        "accuracy) than without normalization or with LN, and smaller still with noisier statistics.",
        "Ioffe & Szegedy 2015, §3.4; Luo et al. 2019 (Towards understanding regularization in BN)",
        (Check("norm", "bn", "none", "<", metric="gap", says="generalization gap: bn minus none"),
         Check("norm", "bn", "ln", "<", metric="gap", says="generalization gap: bn minus ln"),
         Check("config.norm_batch_size", 4, 32, "<", metric="gap", where={"norm": "bn"}, paired=True,
               says="bn at SGD batch 32, generalization gap: statistics over 4 minus over 32")),
        "Ioffe & Szegedy 2015: with BN, Dropout could be removed from BN-Inception without overfitting.",
        "MLP on the MNIST stand-in (2000 training images, 6 epochs), bn, ln, none, batch 32, and bn with statistics "
        "over sub-batches of 4 (ghost BN). The training accuracy is the one over the last epoch, in training mode.",
        ("data.train_size=null", "data.test_size=null", "epochs=20"), "MLP on full MNIST, 20 epochs"),
    Claim(
        "in_contrast", "IN removes instance-specific contrast: under a test-time contrast change IN and GN keep "
        "their accuracy, BN with population statistics loses it, and recomputing BN's statistics on the shifted "
        "data recovers it.",
        "Ulyanov et al. 2016 (Instance Normalization); Schneider et al. 2020 (BN adaptation)",
        (Check("metric", f"test_acc@{SHIFT}", "test_acc", "<", where={"norm": "bn"},
               says="bn: contrast x0.5 minus clean"),
         Check("metric", f"test_acc@{SHIFT}", "test_acc", "not_below", where={"norm": "in"}, margin=1.0,
               says="in: contrast x0.5 minus clean"),
         Check("metric", f"test_acc@{SHIFT}", "test_acc", "not_below", where={"norm": "gn"}, margin=1.0,
               says="gn: contrast x0.5 minus clean"),
         Check("metric", f"test_acc_adapted@{SHIFT}", f"test_acc@{SHIFT}", ">", where={"norm": "bn"},
               says="bn under contrast x0.5: statistics recomputed on the shifted data minus running averages")),
        "Schneider et al. 2020: re-estimating BN statistics on corrupted inputs lowers ImageNet-C error by "
        "several points.",
        "The small CNN on the MNIST stand-in, bn, in and gn, tested clean and with each image's contrast halved.",
        *RESNET_GN_PAPER),
    Claim(
        "not_ics", "BN does not work by reducing internal covariate shift: noisy BN trains about as well as BN and "
        "better than no norm, BN does not lower ICS, and BN narrows the loss range and β-smoothness.",
        "Santurkar et al. 2018 (How does batch normalization help optimization?), §2 and §3",
        (Check("norm", "bn(noise.mean=0.5,noise.std=0.5)", "bn", "not_below", margin=2.0,
               says="noisy bn minus bn, test accuracy"),
         Check("norm", "bn(noise.mean=0.5,noise.std=0.5)", "none", ">", says="noisy bn minus none, test accuracy"),
         Check("norm", "bn", "none", "not_below", metric="ics_l2", says="‖G − G′‖: bn minus none"),
         Check("norm", "bn", "none", "<", metric="loss_range", says="loss range along the gradient: bn minus none"),
         Check("norm", "bn", "none", "<", metric="beta_smoothness", says="effective β-smoothness: bn minus none")),
        "Santurkar et al. 2018, Fig. 2 and 4: noisy BN matches BN; BN's ICS is similar or higher; its loss and "
        "gradient change far less along the gradient.",
        "MLP on the MNIST stand-in, bn, noisy bn and none, batch 32, with the ICS and landscape probes.",
        ("data.train_size=null", "data.test_size=null", "epochs=5"), "MLP on full MNIST, 5 epochs"),
    Claim(
        "skipinit", "BN biases residual blocks towards the identity, and SkipInit trains a ResNet without "
        "normalization.",
        "De & Smith 2020 (Batch normalization biases residual blocks towards the identity function)",
        (Check("norm", "bn", "none", "<", metric="residual_ratio", where={"config.model.residual": "standard"},
               says="Var(branch)/Var(skip) at init: bn minus none"),
         Check("config.model.residual", "skipinit", "standard", ">", where={"norm": "none"}, paired=True,
               says="no norm: SkipInit minus the plain ResNet"),
         Check("cells", {"norm": "none", "config.model.residual": "skipinit"},
               {"norm": "bn", "config.model.residual": "standard"}, "not_below", margin=2.0,
               says="SkipInit without norm minus BN (plain blocks)")),
        "De & Smith 2020, Table 1: Wide-ResNet on CIFAR-10, SkipInit without BN matches BN at batch 64–1024.",
        "ResNet-8 (width 8) on the MNIST stand-in, bn vs none, plain or SkipInit blocks, with the residual probe.",
        ("data=cifar10", "model.depth=20", "model.width=16", "epochs=30", "data.train_size=null",
         "data.test_size=null"), "ResNet-20 on CIFAR-10, 30 epochs"),
    Claim(
        "remedies", "Small-batch remedies work: batch renorm, GN and weight standardization with GN beat BN at "
        "batch 2.",
        "Ioffe 2017 (Batch Renormalization); Wu & He 2018; Qiao et al. 2019 (Weight Standardization)",
        (Check("norm", "brn(warmup_steps=500)", "bn", ">", where={"batch_size": 2}, says="batch 2: brn minus bn"),
         Check("norm", "gn", "bn", ">", where={"batch_size": 2}, says="batch 2: gn minus bn"),
         Check("norm", "ws_gn", "bn", ">", where={"batch_size": 2}, says="batch 2: ws_gn minus bn")),
        "Qiao et al. 2019: at 1 image per GPU, WS+GN reaches or beats BN at large batch on ImageNet; Ioffe 2017: "
        "BRN at batch 4 recovers most of BN's loss.",
        "MLP on the MNIST stand-in at batch 2: bn, brn (limits reached after 500 steps), gn and ws_gn.",
        *RESNET_GN_PAPER),
    Claim(
        "non_iid", "BN suffers when batches are not i.i.d.; batch renorm and GN do not.",
        "Ioffe 2017 (Batch Renormalization), §4.3",
        (Check("config.data.batch_classes", 10, 2, ">", where={"norm": "bn"},
               says="bn: batches from all 10 classes minus from 2"),
         Check("config.data.batch_classes", 2, 10, "not_below", where={"norm": "gn"}, margin=1.0,
               says="gn: batches from 2 classes minus from all 10"),
         Check("norm", "brn(warmup_steps=50)", "bn", ">", where={"config.data.batch_classes": 2},
               says="batches from 2 classes: brn minus bn")),
        "Ioffe 2017, Fig. 3: with non-i.i.d. minibatches BN's validation accuracy falls far below BRN's.",
        "MLP on the MNIST stand-in, bn and gn, batch 40 drawn from 2 classes or from all 10; brn (limits reached "
        "after 50 steps) from 2 classes.",
        ("data.train_size=null", "data.test_size=null", "epochs=5"), "MLP on full MNIST, 5 epochs"),
    Claim(
        "batch_noise", "A batch's mean strays from the population mean as 1/√(values per statistic): the error "
        "against the batch size B has slope −0.5 on a log-log scale.",
        "Independent sampling; measured by normbench's batch-statistics probe",
        (Check("value", "bstats_slope", -0.5, "=", margin=0.1,
               says="log-log slope of the batch mean's error against B, minus −0.5"),),
        "Independent samples give exactly −0.5; correlated features within a batch make it shallower.",
        "MLP on the MNIST stand-in with bn at batch 32, the batch-statistics probe at init and at the end.",
        ("data.train_size=null", "data.test_size=null"), "MLP on full MNIST"),
)

BY_ID = {claim.id: claim for claim in CLAIMS}
_CONFIG_KEYS = {"data", "model", "norm", "optim", "epochs", "epoch", "lr", "seed", "batch_size", "device", "name",
                "results_dir", "threads", "experiment"}  # names that look like an override missing its =VALUE


def select(names: list[str] | None) -> list[Claim]:
    """The named claims in catalog order (all when none are named); an unknown name lists the valid ones."""
    if not names:
        return list(CLAIMS)
    unknown = [n for n in names if n not in BY_ID]
    if unknown:
        hint = " (overrides are written KEY=VALUE)" if "." in unknown[0] or unknown[0] in _CONFIG_KEYS else ""
        raise UserError(f"unknown claim {unknown[0]!r}{hint}; valid: {', '.join(BY_ID)}")
    return [claim for claim in CLAIMS if claim.id in set(names)]
