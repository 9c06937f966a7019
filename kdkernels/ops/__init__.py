"""One ``torch.library`` custom op (with autograd) per loss family; backend dispatch happens here."""
