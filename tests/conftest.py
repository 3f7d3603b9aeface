from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffeat.core.plugins import PluginManager, reset_plugin_manager
from diffeat.testing import TestPlugin, smooth_texture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("DIFFEAT_STORE", None)  # a user's default store must not leak into the tests


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD 1.x-style model (epsilon prediction) in diffusers format."""
    from diffeat.testing import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd15") / "model")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 2.x-style model with v-prediction."""
    from diffeat.testing import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(
        tmp_path_factory.mktemp("tiny-sd21") / "model",
        prediction_type="v_prediction",
        sd2_style=True,
        seed=1,
    )


@pytest.fixture(scope="session")
def tiny_adm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random guided-diffusion ADM UNet, converted from official key names."""
    from diffeat.testing.adm import build_tiny_adm

    return build_tiny_adm(tmp_path_factory.mktemp("tiny-adm") / "model")


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX folder (transformer, VAE, CLIP and T5 encoders)."""
    from diffeat.testing.dit import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture(scope="session")
def tiny_dino_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DINO ViT (patch 8, trained at 32 px), built once per session."""
    from diffeat.testing.vit import build_tiny_dino

    return build_tiny_dino(tmp_path_factory.mktemp("tiny-dino") / "model")


@pytest.fixture(scope="session")
def tiny_dinov2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DINOv2 (patch 14, 56 px position grid), built once per session."""
    from diffeat.testing.vit import build_tiny_dinov2

    return build_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2") / "model")


@pytest.fixture(scope="session")
def tiny_openclip_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny random OpenCLIP model: ``(model config file, checkpoint file)``."""
    from diffeat.testing.vit import build_tiny_openclip

    return build_tiny_openclip(tmp_path_factory.mktemp("tiny-openclip") / "model")


@pytest.fixture
def manager() -> PluginManager:
    """A plugin manager with the built-ins and the test plugin (``color-blur``)."""
    pm = PluginManager(entry_points=False)
    pm.add_plugin(TestPlugin(), "testing")
    reset_plugin_manager(pm)
    yield pm
    reset_plugin_manager(None)


@pytest.fixture
def texture_files(tmp_path: Path) -> list[Path]:
    paths = []
    for i, size in enumerate([(96, 64), (64, 80), (72, 72)]):
        p = tmp_path / f"img{i}.png"
        smooth_texture(size, seed=i).save(p)
        paths.append(p)
    return paths
