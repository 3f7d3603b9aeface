from __future__ import annotations

from diffeat.testing import ColorBlurExtractor, ExtractorConformance


class TestColorBlurConformance(ExtractorConformance):
    def make_extractor(self) -> ColorBlurExtractor:
        return ColorBlurExtractor(ColorBlurExtractor.Options(image_size=[32, 24], stride=2))


def test_the_package_keeps_every_name_of_the_former_modules() -> None:
    """diffeat.testing was a module (plus testing_models, testing_vit): its names stay importable."""
    import diffeat.testing as testing

    for name in (
        "ColorBlurExtractor",
        "ColorBlurOptions",
        "ExtractorConformance",
        "MultiColorBlurExtractor",
        "MultiColorBlurOptions",
        "TestPlugin",
        "build_tiny_captioner",
        "build_tiny_stable_diffusion",
        "smooth_texture",
        "write_clip_tokenizer",
    ):
        assert hasattr(testing, name), name
    assert set(testing.__all__) <= set(dir(testing))
