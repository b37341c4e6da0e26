# Source on the GPU machine (the `device` tool), from the repository root: installs the carried
# wheels (.whl: fla-core, jax-linear-attention, ...) into /tmp/site and makes this checkout
# importable as `jaxprfaas` (the package's root is the repository root, mapped by pyproject.toml;
# a tree of links under /tmp/pkg does the same without pip). Then `cd /tmp` keeps the checkout's
# own directories from shadowing the package.
REPO=$(pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl || return 1
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/jaxprfaas
for f in "$REPO"/jaxprfaas/* "$REPO"/model "$REPO"/pallas_kernels "$REPO"/runtime "$REPO"/scheduler; do
  ln -s "$f" /tmp/pkg/jaxprfaas/
done
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 REPO
