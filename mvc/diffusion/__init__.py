"""The diffusion side: Stable Diffusion's parts and folders (`models`), its inputs prepared one way (`sd_io`), the
tiny base and the hub stand-ins, clustering-based sampling, and the three trainers: InstructPix2Pix fine-tuning
(`finetune*`), DreamBooth, textual inversion."""
