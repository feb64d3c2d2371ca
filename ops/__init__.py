"""Native sources of the MSDA and DCNv2 ops (shipped as package data, compiled on first use into one extension)."""
