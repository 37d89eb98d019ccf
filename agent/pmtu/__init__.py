"""Path-MTU probing through each tunnel: the pure search and its I/O."""
