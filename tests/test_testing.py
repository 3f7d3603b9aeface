from __future__ import annotations

from diffeat.testing import ColorBlurExtractor, ExtractorConformance


class TestColorBlurConformance(ExtractorConformance):
    def make_extractor(self) -> ColorBlurExtractor:
        return ColorBlurExtractor(ColorBlurExtractor.Options(image_size=[32, 24], stride=2))
