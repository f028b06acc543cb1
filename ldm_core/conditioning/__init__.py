"""What a prompt becomes on its way into the UNet and where it applies: the Cond payload,
areas, masks and time ranges; box layouts; inpainting inputs and the known region."""
