"""The Ray Train trainer `asft recover` uses (issue 17 item 11, second half): Ray Train's PlacementGroupCleaner
(a state-API poller that fails without a dashboard and prints tracebacks, or asks another cluster about ours)
and its SIGINT handler are left out, and an interrupt kills the Train controller before Ray shuts down.
No Ray cluster: the trainer is only built, and `fit` runs with a stand-in trainer."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.train")

from asft_ray.recovery import recipe  # noqa: E402
from asft_ray.recovery.config import RecoverConfig  # noqa: E402


def build(cls, tmp_path):
    from ray.train import RunConfig, ScalingConfig

    return cls(lambda config: None, scaling_config=ScalingConfig(num_workers=1),
               run_config=RunConfig(name="t", storage_path=str(tmp_path)))


def callback_names(trainer) -> list[str]:
    return [type(cb).__name__ for cb in trainer._create_default_callbacks()]


def test_the_placement_group_cleaner_is_left_out_and_nothing_else(tmp_path):
    from ray.train.torch import TorchTrainer

    stock = callback_names(build(TorchTrainer, tmp_path))
    ours = callback_names(build(recipe.trainer_class(), tmp_path))
    if "PlacementGroupCleanerCallback" not in stock:
        pytest.skip("this Ray Train has no PlacementGroupCleaner")
    assert ours == [name for name in stock if name != "PlacementGroupCleanerCallback"]


def test_ray_trains_sigint_handler_is_not_installed(tmp_path):
    trainer = build(recipe.trainer_class(), tmp_path)
    before = signal.getsignal(signal.SIGINT)
    trainer._register_sigint_handler("the controller")  # what fit() calls right after starting the controller
    assert signal.getsignal(signal.SIGINT) is before
    assert trainer.controller == "the controller"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, type("Terminated", (KeyboardInterrupt,), {})])
def test_an_interrupt_during_fit_kills_the_controller_then_propagates(tmp_path, monkeypatch, interrupt):
    import ray

    killed = []

    class Interrupted:
        controller = None

        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            self.controller = "the controller"
            raise interrupt()

    monkeypatch.setattr(recipe, "trainer_class", lambda: Interrupted)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4})
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.append((actor, no_restart)))
    cfg = RecoverConfig(model="m", out=str(tmp_path / "out"), device="cpu")
    with pytest.raises(interrupt):
        recipe.fit(cfg, SimpleNamespace(), None, None, tmp_path, tmp_path / "export", {"model": "m"}, None)
    assert killed == [("the controller", True)]
