"""Side-by-side benchmarks of llorch against its peers (issue 5): `python -m bench`.

See bench/README.md for what each figure means and how to run it.
"""
