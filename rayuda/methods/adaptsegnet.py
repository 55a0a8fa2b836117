"""``adaptsegnet`` (Tsai et al. 2018, eq. 3–5): output-space adversarial alignment of softmax maps."""

from __future__ import annotations

from rayuda.methods.adversarial import OutputSpaceAdversarial


class AdaptSegNet(OutputSpaceAdversarial):
    name = "adaptsegnet"

    def discriminator_input(self, ctx, prob):
        return prob
