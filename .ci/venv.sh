# Sourced by .ci/run: create (or reuse) a virtual environment outside the clone,
# keyed by a hash of pyproject.toml and constraints-ci.txt, and activate it.
distill_venv() {
    local root="${DISTILL_VENV_ROOT:-$HOME/.cache/distill-venvs}"
    local key
    key="$(cat pyproject.toml constraints-ci.txt | sha256sum | cut -c1-16)"
    local venv="$root/$key"
    if [ ! -f "$venv/.complete" ]; then
        rm -rf "$venv"
        mkdir -p "$root"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -c constraints-ci.txt -e '.[dev]'
        touch "$venv/.complete"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    # The checkout may have moved (CI clones afresh): re-point the editable install at this one.
    python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
}
