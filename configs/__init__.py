"""Model configs (YAML), shipped inside the package as bevdeform._configs."""
