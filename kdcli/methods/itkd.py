"""Instance temperature KD (ITKD, called RLKD in the paper; Zhang et al., arXiv 2407.00115).

A PPO agent picks one distillation temperature per training instance from a 3-number state
(student confidence, teacher confidence, student top-1/top-2 margin); the student minimises its host
loss (KD or DKD) with those temperatures, and the change of the student's batch accuracy is the
agent's reward. The networks, optimisers and schedule follow the released code
(`Zhengbo-Zhang/ITKD`, `utils/trainer.py`); the paper body was not accessible.

Two variants (`--set variant=...`):

* `intent` (default), what the paper describes, with the code's slips repaired:
  - state margin = top-1 minus top-2 student probability;
  - T_i = clamp(10 * sigmoid(u_i), t_min, t_max) = [1, 10], u_i ~ N(mu(s_i), sigma), and PPO uses
    the log-likelihood of the Gaussian sample u_i (the squashing does not depend on the weights, so
    the ratio is exact);
  - reward for the temperatures of step k = (acc_{k+1} - acc_k) * c(e), where acc is the plain
    top-1 accuracy of the student on its training batch before the optimiser step: acc_{k+1} is the
    first accuracy measured after the update that used those temperatures;
  - instance reward calibration is applied: the redistribution net scores each (state, T) pair with
    a contribution g_i, trained (Adam, 9 steps per trajectory) so that sum_i g_i predicts the
    trajectory's reward R; the calibrated rewards g_i + (R - sum_j g_j) / n (return-equivalent, they
    sum to R) replace the sparse reward, and GAE advantages and returns are recomputed from them.
    This is the memoryless form of the RUDDER LSTM the code started from (no forget gate, identity
    output: the cell accumulates per-step inputs); the RUDDER auxiliary "predict R at every prefix"
    loss is left out because every instance contributes to the batch reward, so early prefixes
    cannot predict it;
  - DKD host: each sample's KL is scaled by its own T_i^2.
* `code`: the released code, slips included: the third state feature uses `kthvalue(p, 2)` (the
  second *smallest* probability); T_i = 10 * sigmoid(u_i), unclamped; the log-likelihood is taken
  at the squashed T_i; the reward is acc_{k-1} - acc_{k-2} (one step late) with torchmetrics' macro
  accuracy; the redistribution net is trained on (mean(P - R))^2 * 1.5 against the per-position
  returns, but its rewards never reach the advantages (the code's second `finish_path` is a no-op),
  so they are not computed here; c(240) = 1 (no branch covers e = 240); DKD multiplies the mean KL
  by mean(T^2) (the [B] x [B, 1] broadcast).

Shared by both: Gaussian actor 3-256-256-1 with tanh mean and state-independent log sigma =
sum(theta) - 0.5 (theta in R^10, zeros), exploration noise always on; critic 3-256-256-1; one
trajectory per training batch (instances in batch order, the protocol's B = 64), a sparse reward on
its last step, GAE (gamma 0.99, lambda 0.95) bootstrapped with the value of the last state, advantage
normalisation; the critical-state detector (3-16-1, sigmoid), trained 10 Adam steps per trajectory
on 5e-3 * sum(masks) (the code's cross-entropy term has a single column and is identically 0, so it
is omitted), whose masks multiply the stored states before the PPO update; 5 critic epochs (MSE to
the returns) and 5 actor epochs (clipped surrogate, eps 0.2, no entropy bonus), one minibatch each,
grad-norm clip 2.0. Adam: actor 1e-4, critic 1e-3, redistribution and detector 1e-3 (`aux_lr`).
These optimisers are the method's own (`own_optimizers`, checkpointed by the engine); the agent is
never in the student's SGD and gets no gradient from the student loss (T is a constant there).

Schedule (1-based epoch e): e < `warmup` uses the fixed temperature `T` = 4; from e = `warmup` on the
agent picks the temperatures; it learns only in epochs with e % `rl_every` == 0 (20, 40, ..., 240,
as the code). c(e) = 10 (1 + (1 + cos(pi e / 75)) / 2) for e < 150, 5 (1 + (1 + cos(pi e / 30)) / 2)
for e < 210, 2 (...) for e < 240 (intent: also e = 240). For a run of E != 240 epochs, c is read at
the equivalent epoch 240 e / E, and `warmup`, `rl_every` and `dkd_warmup`, when not set explicitly,
become max(1, round(value * E / 240)) (a 2-epoch run: agent from epoch 1, learning every epoch);
values given with --set are used as they are.

Host loss (`host`): `kd` -> ce * CE + kd * KD(T_i) with ce 0.1, kd 0.9; `dkd` -> ce * CE + kd *
min(e / dkd_warmup, 1) * DKD(alpha 1, beta 8, T_i) with ce and kd defaulting to 1. The DKD host is
built from `kdcli.losses.dkd_loss` here, independent of the `dkd` method.

Rollout state: a trajectory waits one step for its reward; the one still waiting when an epoch
ends is dropped (the code also discards it), so everything an exact resume needs at an epoch
boundary is in `state_dict()` (weights, the last two batch accuracies) and the four optimisers;
a run stopped inside an epoch also checkpoints the waiting trajectory and the epoch's temperature
sums (`running_state`), so that resuming replays the rest of the epoch exactly.
`purify=true`: the code's entropy-ranked mixup "purification" of the training images, one epoch in
every `purify_every` (20), see `kdcli.methods.purify`; off by default. Not implemented: syncing
agents across processes (under DDP every process would run its own agent).
Per epoch, metrics.jsonl gets `itkd_T_mean`, `itkd_T_std` (over all chosen temperatures) and
`itkd_agent_updates` (trajectories the agent learned from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.batch import Batch
from kdcli.engine.distributed import average_parameter_gradients
from kdcli.errors import KdError
from kdcli.losses import dkd_loss, kd_loss
from kdcli.methods.base import Method, Shapes, coerce, register
from kdcli.methods.purify import Purifier
from kdcli.models.features import Outputs

REFERENCE_EPOCHS = 240  # the CIFAR-100 protocol the code's schedule constants are written for
STATE_DIM = 3
AGENT_HIDDEN = 256
AUX_HIDDEN = 16  # the code's "n_lstm" of the redistribution net and the state detector
LOG_STD_PARTS = 10  # log sigma = sum of 10 zero-initialised parameters - 0.5
LOG_STD_OFFSET = 0.5
TEMPERATURE_SCALE = 10.0  # T = 10 * sigmoid(u)
_VARIANTS = ("intent", "code")
_HOSTS = ("kd", "dkd")
_SCALED_WITH_RUN = ("warmup", "rl_every", "dkd_warmup")


# ---- pure pieces (tested on their own) ------------------------------------------------------------


def reward_scale(epoch: float, epochs: int = REFERENCE_EPOCHS, code: bool = False) -> float:
    """c(e): the code's cosine-shaped reward scale for CIFAR-100, read at the equivalent epoch of a
    240-epoch run. From e = 240 on, the code applies no scale (1); the intent variant keeps the last
    piece."""
    e = epoch * REFERENCE_EPOCHS / epochs
    if e < 150:
        amplitude, period = 10.0, 75.0
    elif e < 210:
        amplitude, period = 5.0, 30.0
    elif e < REFERENCE_EPOCHS or not code:
        amplitude, period = 2.0, 30.0
    else:
        return 1.0
    return amplitude * (1.0 + (1.0 + math.cos(math.pi * e / period)) / 2.0)


def state_features(student_logits: Tensor, teacher_logits: Tensor, code: bool = False) -> Tensor:
    """[B, 3] agent states from T = 1 probabilities: max p_s, max p_t, and max p_s minus the second
    largest p_s (code: minus the second *smallest*, torch.kthvalue(p_s, 2))."""
    p_s = F.softmax(student_logits, dim=1)
    p_t = F.softmax(teacher_logits, dim=1)
    if code:
        top1 = p_s.max(dim=1).values
        second = torch.kthvalue(p_s, 2, dim=1).values
    else:
        top1, second = p_s.topk(2, dim=1).values.unbind(dim=1)
    return torch.stack((top1, p_t.max(dim=1).values, top1 - second), dim=1)


def gaussian_log_prob(x: Tensor, mu: Tensor, log_std: Tensor) -> Tensor:
    """Elementwise log N(x; mu, exp(log_std)^2), with the code's 1e-8 added to sigma."""
    z = (x - mu) / (log_std.exp() + 1e-8)
    return -0.5 * (z * z + 2.0 * log_std + math.log(2.0 * math.pi))


def discounted_sum(x: Tensor, factor: float) -> Tensor:
    """y_k = sum_{j >= k} factor^(j - k) x_j of a 1-D sequence, as one triangular matrix product."""
    steps = torch.arange(x.shape[0], device=x.device)
    gap = (steps[None, :] - steps[:, None]).to(x.dtype)
    weights = torch.where(gap >= 0, torch.pow(factor, gap.clamp(min=0)), torch.zeros_like(gap))
    return weights @ x


def gae(rewards: Tensor, values: Tensor, last_value: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE-lambda advantages and discounted returns-to-go of one trajectory, bootstrapped with
    `last_value` after its final step (OpenAI spinning-up `finish_path`)."""
    next_values = torch.cat((values[1:], last_value.reshape(1)))
    deltas = rewards + gamma * next_values - values
    remaining = torch.arange(rewards.shape[0], 0, -1, device=rewards.device).to(rewards.dtype)
    returns = discounted_sum(rewards, gamma) + torch.pow(gamma, remaining) * last_value
    return discounted_sum(deltas, gamma * lam), returns


def normalize_advantages(advantages: Tensor) -> Tensor:
    """(a - mean) / std with the population std; the 1e-8 only guards a one-step trajectory."""
    return (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """PPO's loss -mean(min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)), rho = exp(logp - logp_old)."""
    ratio = (log_prob - old_log_prob).exp()
    return -torch.min(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages).mean()


def batch_accuracy(logits: Tensor, target: Tensor, macro: bool = False) -> Tensor:
    """Top-1 accuracy in [0, 1] as a 0-dim tensor. `macro`: torchmetrics' multiclass default, the
    mean recall over the classes that occur as a label or a prediction in the batch."""
    predicted = logits.argmax(dim=1)
    hits = (predicted == target).to(logits.dtype)
    if not macro:
        return hits.mean()
    classes = logits.shape[1]
    labels = F.one_hot(target, classes).to(logits.dtype)
    support = labels.sum(dim=0)
    true_pos = (labels * hits[:, None]).sum(dim=0)
    present = (support + F.one_hot(predicted, classes).to(logits.dtype).sum(dim=0) - true_pos) > 0
    recall = true_pos / support.clamp(min=1.0)
    return (recall * present).sum() / present.sum()


def calibrated_rewards(contributions: Tensor, episode_return: Tensor) -> Tensor:
    """Instance rewards g_i + (R - sum_j g_j) / n: the predicted contributions with the prediction
    error shared equally, so that they sum to the observed return R."""
    return contributions + (episode_return - contributions.sum()) / contributions.shape[0]


# ---- the agent's networks ------------------------------------------------------------------------


def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Gaussian policy: mean tanh(MLP(s)), state-independent log sigma = sum(theta) - 0.5."""

    def __init__(self):
        super().__init__()
        self.mean = _mlp((STATE_DIM, AGENT_HIDDEN, AGENT_HIDDEN, 1))
        self.log_std_parts = nn.Parameter(torch.zeros(LOG_STD_PARTS, 1))

    def forward(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """mu [B] and log sigma (0-dim)."""
        return torch.tanh(self.mean(states)).squeeze(1), self.log_std_parts.sum() - LOG_STD_OFFSET


class Critic(nn.Module):
    """State value V(s) [B]."""

    def __init__(self):
        super().__init__()
        self.value = _mlp((STATE_DIM, AGENT_HIDDEN, AGENT_HIDDEN, 1))

    def forward(self, states: Tensor) -> Tensor:
        return self.value(states).squeeze(1)


class RewardRedistribution(nn.Module):
    """Linear(state + T -> 16) -> Linear(16 -> 1), one output per instance (the code replaced the
    RUDDER LSTM by the first linear layer)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(STATE_DIM + 1, AUX_HIDDEN), nn.Linear(AUX_HIDDEN, 1))

    def forward(self, states: Tensor, temperatures: Tensor) -> Tensor:
        return self.net(torch.cat((states, temperatures[:, None]), dim=1)).squeeze(1)


class CriticalStateDetector(nn.Module):
    """Linear(3 -> 16) -> Linear(16 -> 1) -> sigmoid: a mask in (0, 1) per state."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(STATE_DIM, AUX_HIDDEN), nn.Linear(AUX_HIDDEN, 1))

    def forward(self, states: Tensor) -> Tensor:
        return torch.sigmoid(self.net(states)).squeeze(1)


@dataclass
class Rollout:
    """One trajectory (a training batch) waiting for its reward."""

    states: Tensor  # [n, 3]
    actions: Tensor  # [n]: u (intent) or T (code), what the log-likelihood is taken of
    temperatures: Tensor  # [n]
    log_probs: Tensor  # [n]
    values: Tensor  # [n]
    accuracy: Tensor  # 0-dim: the student's batch accuracy when the temperatures were chosen


# ---- the method ----------------------------------------------------------------------------------


@register("itkd")
class InstanceTemperatureKD(Method):
    """KD (or DKD) with a temperature per instance chosen by a PPO agent (see the module docstring
    for the variants, the schedule, and what scales with the run length)."""

    title = "Instance Temperature Knowledge Distillation (RLKD)"
    paper = "Zhang, Zhou, Gong, Liu & Tu, arXiv 2024 (arXiv 2407.00115)"
    year = 2024
    defaults = {
        "ce": 0.1, "kd": 0.9, "T": 4.0,
        "host": "kd", "variant": "intent",
        "warmup": 20, "rl_every": 20,
        "t_min": 1.0, "t_max": 10.0,
        "gamma": 0.99, "lam": 0.95, "clip": 0.2,
        "critic_epochs": 5, "actor_epochs": 5,
        "actor_lr": 1e-4, "critic_lr": 1e-3, "aux_lr": 1e-3, "max_grad_norm": 2.0,
        "redistribution_steps": 9, "detector_steps": 10, "detector_l1": 5e-3,
        "dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup": 20,
        "purify": False, "purify_every": 20,
    }
    ranges = {
        "warmup": "nonnegative", "rl_every": "count", "t_min": "positive", "t_max": "positive",
        "gamma": "fraction", "lam": "fraction", "clip": "positive", "critic_epochs": "count",
        "actor_epochs": "count", "actor_lr": "positive", "critic_lr": "positive", "aux_lr": "positive",
        "max_grad_norm": "positive", "redistribution_steps": "count", "detector_steps": "count",
        "detector_l1": "nonnegative", "dkd_alpha": "nonnegative", "dkd_beta": "nonnegative",
        "dkd_warmup": "nonnegative",
    }

    def __init__(self, student: Shapes, teacher: Shapes, num_samples: int, teacher_head=None, **hparams: Any):
        given = frozenset(hparams)
        if coerce("host", hparams.get("host", "kd"), "kd") == "dkd":
            hparams = {"ce": 1.0, "kd": 1.0, **hparams}  # DKD's own weights unless set
        super().__init__(student, teacher, num_samples, teacher_head=teacher_head, **hparams)
        self._given = given
        self._check_options()
        hp = self.hp
        self.code = hp["variant"] == "code"
        self.actor = Actor()
        self.critic = Critic()
        self.redistribution = RewardRedistribution()
        self.detector = CriticalStateDetector()
        # [acc_{k-2}, acc_{k-1}]: the code variant's reward needs the accuracy before the rollout's
        self.register_buffer("recent_accuracy", torch.full((2,), float("nan")))
        self._optimizers = {
            "actor": torch.optim.Adam(self.actor.parameters(), lr=hp["actor_lr"]),
            "critic": torch.optim.Adam(self.critic.parameters(), lr=hp["critic_lr"]),
            "redistribution": torch.optim.Adam(self.redistribution.parameters(), lr=hp["aux_lr"]),
            "detector": torch.optim.Adam(self.detector.parameters(), lr=hp["aux_lr"]),
        }
        self.schedule = {key: hp[key] for key in _SCALED_WITH_RUN}
        self._pending: Rollout | None = None
        self._reset_epoch_stats()
        self.purifier = purifier_option(hp, num_samples)

    def _check_options(self) -> None:
        hp = self.hp
        if hp["variant"] not in _VARIANTS:
            raise KdError(f"itkd variant={hp['variant']!r} is unknown", "use variant=intent (default) or variant=code")
        if hp["host"] not in _HOSTS:
            raise KdError(f"itkd host={hp['host']!r} is not supported", "use host=kd (default) or host=dkd")
        if hp["warmup"] < 1 or hp["rl_every"] < 1 or hp["dkd_warmup"] < 0:
            raise KdError(
                f"itkd needs warmup >= 1, rl_every >= 1 and dkd_warmup >= 0 epochs, got warmup={hp['warmup']}, "
                f"rl_every={hp['rl_every']}, dkd_warmup={hp['dkd_warmup']}",
                "e.g. --set warmup=1 rl_every=1 lets the agent act and learn from the first epoch",
            )
        if not 0 < hp["t_min"] < hp["t_max"] <= TEMPERATURE_SCALE:
            raise KdError(
                f"itkd needs 0 < t_min < t_max <= {TEMPERATURE_SCALE:g}, got t_min={hp['t_min']}, t_max={hp['t_max']}",
                "the agent's temperatures are 10 * sigmoid(u); the default range is [1, 10]",
            )

    # ---- engine hooks --------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """None: the agent's networks are trained by their own Adam optimisers, not the student's SGD."""
        return []

    def own_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self._optimizers)

    def image_edits(self, epoch: int):
        return self.purifier.edits(epoch) if self.purifier is not None else None

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        for key in _SCALED_WITH_RUN:
            value = self.hp[key]
            if key not in self._given and epochs != REFERENCE_EPOCHS:
                value = max(1, round(value * epochs / REFERENCE_EPOCHS))
            self.schedule[key] = value
        self._pending = None
        self._reset_epoch_stats()

    def epoch_metrics(self) -> dict[str, float]:
        if self._t_count == 0:
            return {}
        shift_mean = self._t_sum.item() / self._t_count
        variance = max(self._t_sq.item() / self._t_count - shift_mean**2, 0.0)
        return {
            "itkd_T_mean": self.hp["T"] + shift_mean,
            "itkd_T_std": math.sqrt(variance),
            "itkd_agent_updates": float(self._updates),
        }

    def running_state(self) -> dict[str, Any]:
        """The rollout waiting for its reward and the epoch's temperature sums: what a mid-epoch
        resume needs to replay the rest of a learning epoch exactly."""
        pending = None if self._pending is None else {
            name: getattr(self._pending, name) for name in Rollout.__dataclass_fields__
        }
        return {"pending": pending, "t_sum": self._t_sum, "t_sq": self._t_sq,
                "t_count": self._t_count, "updates": self._updates}

    def load_running_state(self, state: dict[str, Any]) -> None:
        device = self.recent_accuracy.device
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in state.items() if k != "pending"}
        pending = state["pending"]
        self._pending = None if pending is None else Rollout(**{k: v.to(device) for k, v in pending.items()})
        self._t_sum, self._t_sq = moved["t_sum"], moved["t_sq"]
        self._t_count, self._updates = int(moved["t_count"]), int(moved["updates"])

    def _reset_epoch_stats(self) -> None:
        # sums of (T - base T) and its square: small numbers, so float32 keeps the std accurate
        self._t_sum: Tensor | float = 0.0
        self._t_sq: Tensor | float = 0.0
        self._t_count = 0
        self._updates = 0

    @property
    def agent_acts(self) -> bool:
        return self.epoch >= self.schedule["warmup"]

    @property
    def agent_learns(self) -> bool:
        return self.agent_acts and self.epoch % self.schedule["rl_every"] == 0

    # ---- loss ----------------------------------------------------------------------------------

    def forward(self, s: Outputs, t: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        if t is None:
            raise KdError("itkd needs a teacher", "pass --teacher")
        n = batch.y.numel()
        student, teacher = s.logits[:n], t.logits[:n]
        temperatures = self.temperatures(student, teacher, batch.y)
        if self.purifier is not None and self.training:
            self.purifier.record(student, batch.index)
        terms: dict[str, Tensor] = {}
        if self.hp["ce"]:
            terms["ce"] = self.hp["ce"] * self.cross_entropy(student, batch.y)
        if self.hp["kd"]:
            terms[self.hp["host"]] = self.host_loss(student, teacher, batch.y, temperatures)
        return terms

    def host_loss(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperatures: Tensor) -> Tensor:
        """The weighted distillation term of the host method with per-instance temperatures [B]."""
        temperatures = temperatures.to(torch.promote_types(temperatures.dtype, student_logits.dtype))
        if self.hp["host"] == "kd":
            return self.hp["kd"] * kd_loss(student_logits, teacher_logits, temperatures)
        warmup = self.schedule["dkd_warmup"]
        weight = self.hp["kd"] * (1.0 if warmup <= 0 else min(self.epoch / warmup, 1.0))
        alpha, beta = self.hp["dkd_alpha"], self.hp["dkd_beta"]
        if not self.code:
            return weight * dkd_loss(student_logits, teacher_logits, target, alpha, beta, temperatures)
        # the code: KL_i at T_i (logits pre-divided, so dkd_loss's T = 1), times mean_j T_j^2
        column = temperatures[:, None]
        per_instance = dkd_loss(student_logits / column, teacher_logits / column, target, alpha, beta, 1.0)
        return weight * per_instance * temperatures.pow(2).mean()

    # ---- the agent -----------------------------------------------------------------------------

    def temperatures(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """The temperatures [B] for this step (no gradient). In agent-training epochs this also
        rewards and learns from the previous step's trajectory, and keeps this step's for the next."""
        device = student_logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            student = student_logits.detach().float()
            teacher = teacher_logits.detach().float()
            accuracy = batch_accuracy(student, target, macro=self.code)
            if self._pending is not None:
                self._learn(self._pending, self._reward(accuracy))
                self._pending = None
            if self.agent_acts:
                temperatures = self._act(student, teacher, accuracy)
            else:
                temperatures = student.new_full((student.shape[0],), self.hp["T"])
            self.recent_accuracy.copy_(torch.stack((self.recent_accuracy[1], accuracy)))
        self._record(temperatures)
        return temperatures

    def _reward(self, accuracy: Tensor) -> Tensor:
        scale = reward_scale(self.epoch, self.epochs, self.code)
        if self.code:
            # acc_{k-1} - acc_{k-2}; no earlier accuracy (only at the very first steps) -> 0
            return scale * torch.nan_to_num(self.recent_accuracy[1] - self.recent_accuracy[0], nan=0.0)
        return scale * (accuracy - self._pending.accuracy)

    @torch.no_grad()
    def _act(self, student: Tensor, teacher: Tensor, accuracy: Tensor) -> Tensor:
        states = state_features(student, teacher, self.code)
        mu, log_std = self.actor(states)
        u = mu + log_std.exp() * torch.randn_like(mu)
        squashed = TEMPERATURE_SCALE * torch.sigmoid(u)
        if self.code:
            temperatures = actions = squashed
        else:
            temperatures, actions = squashed.clamp(self.hp["t_min"], self.hp["t_max"]), u
        if self.agent_learns:
            self._pending = Rollout(
                states, actions, temperatures, gaussian_log_prob(actions, mu, log_std), self.critic(states), accuracy
            )
        return temperatures

    def _record(self, temperatures: Tensor) -> None:
        shifted = temperatures.detach().float() - self.hp["T"]
        self._t_sum = self._t_sum + shifted.sum()
        self._t_sq = self._t_sq + shifted.pow(2).sum()
        self._t_count += temperatures.numel()

    def _learn(self, rollout: Rollout, reward: Tensor) -> None:
        """One PPO update from a finished trajectory whose last step earned `reward`."""
        hp = self.hp
        sparse = torch.zeros_like(rollout.values)
        sparse[-1] = reward
        last_value = rollout.values[-1]
        advantages, returns = gae(sparse, rollout.values, last_value, hp["gamma"], hp["lam"])
        with torch.enable_grad():
            self._fit_detector(rollout.states)
            if self.code:
                self._fit_redistribution(rollout, lambda p: 1.5 * (p - returns).mean().pow(2))
            else:
                self._fit_redistribution(rollout, lambda p: (p.sum() - reward).pow(2))
                with torch.no_grad():
                    contributions = self.redistribution(rollout.states, rollout.temperatures)
                advantages, returns = gae(
                    calibrated_rewards(contributions, reward), rollout.values, last_value, hp["gamma"], hp["lam"]
                )
            with torch.no_grad():
                states = rollout.states * self.detector(rollout.states)[:, None]
            advantages = normalize_advantages(advantages)
            for _ in range(hp["critic_epochs"]):
                self._step("critic", F.mse_loss(self.critic(states), returns), self.critic)
            for _ in range(hp["actor_epochs"]):
                mu, log_std = self.actor(states)
                log_prob = gaussian_log_prob(rollout.actions, mu, log_std)
                self._step("actor", clipped_surrogate(log_prob, rollout.log_probs, advantages, hp["clip"]), self.actor)
        for optimizer in self._optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self._updates += 1

    def _fit_detector(self, states: Tensor) -> None:
        for _ in range(self.hp["detector_steps"]):
            self._step("detector", self.hp["detector_l1"] * self.detector(states).sum())

    def _fit_redistribution(self, rollout: Rollout, loss_of) -> None:
        for _ in range(self.hp["redistribution_steps"]):
            self._step("redistribution", loss_of(self.redistribution(rollout.states, rollout.temperatures)))

    def _step(self, name: str, loss: Tensor, clipped: nn.Module | None = None) -> None:
        optimizer = self._optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Every rank steps the same agent: its gradients are averaged over the ranks' rollouts.
        for group in optimizer.param_groups:
            average_parameter_gradients(group["params"])
        if clipped is not None:
            nn.utils.clip_grad_norm_(clipped.parameters(), self.hp["max_grad_norm"])
        optimizer.step()


def purifier_option(hp: dict, num_samples: int) -> Purifier | None:
    """The `purify` option: ITKD's entropy-ranked mixup of the training images (kdcli.methods.purify)."""
    if not hp["purify"]:
        return None
    if hp["purify_every"] < 1:
        raise KdError(f"itkd needs purify_every >= 1, got {hp['purify_every']}", "e.g. --set purify_every=20")
    return Purifier(num_samples, every=hp["purify_every"])
