"""``advent`` (Vu et al. 2019, eq. 7–8): adversarial alignment of weighted self-information maps."""

from __future__ import annotations

from rayuda.losses import weighted_self_information
from rayuda.methods.adversarial import OutputSpaceAdversarial


class AdvEnt(OutputSpaceAdversarial):
    name = "advent"

    def discriminator_input(self, ctx, prob):
        return weighted_self_information(prob)
