"""The detector: backbone, neck, BEV encoder, decoder, head. Imports only torch and numpy."""
