"""The committed best-method configs (issue #15) run the protocol: 32 x 2048 C4 calibration, seed 0."""

from asft_ray.config import PruneConfig, load_yaml
from asft_ray.methods import registry
from tests.conftest import REPO


def test_the_best_50_percent_config_is_the_valid_choice_on_the_protocols_calibration():
    cfg = PruneConfig.from_dict(load_yaml(str(REPO / "configs" / "smollm2-best-50.yaml")))
    assert (cfg.model, cfg.pattern, cfg.sparsity) == ("smollm2-135m", "unstructured", 0.5)
    assert (cfg.nsamples, cfg.seqlen, cfg.seed) == (32, 2048, 0)
    recipe = registry.resolve(cfg.method)
    assert recipe.method.name == "sparsegpt" and not recipe.refinements
    assert (cfg.reconstruct_epochs, cfg.reconstruct_lr) == (1, 1e-3)  # 32 steps a layer on 32 windows, as on valid


def test_the_best_2of4_config_is_the_valid_choice_on_the_protocols_calibration():
    cfg = PruneConfig.from_dict(load_yaml(str(REPO / "configs" / "smollm2-best-2of4.yaml")))
    assert (cfg.model, cfg.pattern, cfg.sparsity) == ("smollm2-135m", "2:4", 0.5)
    assert (cfg.nsamples, cfg.seqlen, cfg.seed) == (32, 2048, 0)
    recipe = registry.resolve(cfg.method)
    assert recipe.method.name == "sparsegpt" and not recipe.refinements and cfg.channel_permutation
    assert (cfg.reconstruct_epochs, cfg.reconstruct_lr) == (1, 1e-3)
