#!/usr/bin/env bash
# What `docker compose up` needs, each made only when missing (`make images` runs this):
#  1. a Docker engine with Compose v2. Where there is none and we are root on Debian: Debian's
#     docker.io, its dockerd started by hand (no systemd), and Compose v2 from Debian's
#     docker-compose package (bookworm's is the old v1, so trixie's, which needs only libc);
#  2. the images the compose file names: the public ones where they can be pulled, else ones
#     built from Debian's packages: a base made by debootstrap (t2i-base:bookworm) and Redis
#     and Prometheus on it (deploy/docker/*.Dockerfile);
#  3. the service image t2i-service:latest (Dockerfile; its layer cache makes a rebuild of
#     unchanged sources take seconds), with the torch wheel, CA bundle and versions that pip
#     has on this machine (deploy/docker/pip/README.md).
# Writes build/compose.env (the image names chosen, for `docker compose --env-file`) and
# build/images.json (how long each image present took to build).
# BASE_IMAGE, REDIS_IMAGE, PROMETHEUS_IMAGE: set one to use that image instead of choosing.
set -euo pipefail
cd "$(dirname "$0")/../.."

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SERVICE_IMAGE=${SERVICE_IMAGE:-t2i-service:latest}
LOCAL_BASE=t2i-base:bookworm
mkdir -p build

say() { echo "prepare: $*" >&2; }

debian_mirror() {  # the mirror apt uses here
    sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1
    sed -n 's/^deb \(\[[^]]*\] \)\?\(http[^ ]*\).*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n 1
}

apt_install() {
    [ "$(id -u)" = 0 ] || { say "as root, or install them yourself: apt-get install $*"; exit 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

engine() {
    if ! command -v dockerd >/dev/null && ! docker info >/dev/null 2>&1; then
        say "installing Docker (Debian's docker.io)"
        apt_install docker.io
    fi
    if ! docker info >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || { say "no Docker engine answers: start it (sudo dockerd)"; exit 1; }
        say "starting dockerd (log: build/dockerd.log)"
        setsid nohup dockerd >build/dockerd.log 2>&1 </dev/null &
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || { tail -n 20 build/dockerd.log; exit 1; }
    fi
    if ! docker compose version >/dev/null 2>&1; then
        say "installing Compose v2 (Debian's docker-compose)"
        if apt-cache policy docker-compose | grep -q 'Candidate: 2\.'; then
            apt_install docker-compose
        else  # bookworm's docker-compose is v1 (Python): trixie's v2 is a static Go binary
            [ "$(id -u)" = 0 ] || { say "install Docker Compose v2"; exit 1; }
            local apt=build/apt-trixie
            mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
            echo "deb $(debian_mirror | head -n 1) trixie main" >"$apt/sources.list"
            local opts=(-o "Dir::Etc::sourcelist=$PWD/$apt/sources.list" -o Dir::Etc::sourceparts=-
                -o "Dir::State::Lists=$PWD/$apt/lists" -o "Dir::Cache=$PWD/$apt/cache")
            apt-get "${opts[@]}" update -qq
            (cd "$apt" && apt-get "${opts[@]}" download docker-compose 2>/dev/null)
            dpkg -i "$apt"/docker-compose_2.*.deb >/dev/null
        fi
    fi
    docker compose version >&2
}

present() { docker image inspect "$1" >/dev/null 2>&1; }

# The public image if it is here or can be pulled, else "" (a machine with no registry).
public() {
    if present "$1" || timeout 600 docker pull -q "$1" >/dev/null 2>&1; then echo "$1"; fi
}

record() {  # record NAME START [LOG]: the image NAME (as it is now) took from START (epoch s)
    python3 - "$1" "$2" "${3:-}" <<'EOF'  # to build, with LOG's steps taken from the layer cache
import json, pathlib, subprocess, sys, time
name, seconds, log = sys.argv[1], time.time() - float(sys.argv[2]), sys.argv[3]
path = pathlib.Path("build/images.json")
data = json.loads(path.read_text()) if path.exists() else {}
inspect = ["docker", "image", "inspect", "-f", "{{.Id}} {{.Size}}", name]
image_id, size = subprocess.run(inspect, capture_output=True, text=True, check=True).stdout.split()
if data.get(name, {}).get("id") != image_id:  # a new image: a cached rebuild keeps the record
    data[name] = {"id": image_id, "build_s": round(seconds, 1), "size_bytes": int(size),
                  "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if log:
        text = pathlib.Path(log).read_text()
        data[name]["steps"] = text.count("\nStep ")
        data[name]["steps_cached"] = text.count("Using cache")
path.write_text(json.dumps(data, indent=2) + "\n")
EOF
}

build() {  # build NAME DOCKERFILE [ARGS...]: docker build, host network, timed and recorded
    local name=$1 file=$2 t0 log
    shift 2
    log=build/build-${name%%:*}.log
    say "building $name (log: $log)"
    t0=$(date +%s.%N)
    DOCKER_BUILDKIT=0 docker build --network host -f "$file" -t "$name" "$@" . >"$log" 2>&1 \
        || { tail -n 30 "$log"; exit 1; }
    record "$name" "$t0" "$log"
}

local_base() {
    present "$LOCAL_BASE" && return
    command -v debootstrap >/dev/null || apt_install debootstrap
    local root=build/rootfs t0
    t0=$(date +%s.%N)
    rm -rf "$root"
    say "making $LOCAL_BASE with debootstrap (Debian bookworm, minbase, python3)"
    debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$root" \
        "$(debian_mirror | head -n 1)" >build/debootstrap.log
    tar -C "$root" -c . | docker import - "$LOCAL_BASE" >/dev/null
    rm -rf "$root"
    record "$LOCAL_BASE" "$t0"
}

pip_setting() {  # a pip setting as pip sees it here (environment or config files)
    python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'$/\1/p" | head -n 1
}

pip_inputs() {
    local dir=deploy/docker/pip links cert wheel=""
    rm -f "$dir"/*.whl "$dir"/ca.crt "$dir"/constraints.txt
    for links in ${PIP_FIND_LINKS:-} $(pip_setting find-links); do
        wheel=$(ls "$links"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl 2>/dev/null | head -n 1) || true
        [ -n "$wheel" ] && break
    done
    if [ -n "$wheel" ]; then
        say "torch from $wheel"
        ln -f "$wheel" "$dir/" 2>/dev/null || cp "$wheel" "$dir/"
    fi
    cert=${PIP_CERT:-$(pip_setting cert)}
    if [ -n "$cert" ]; then cp "$cert" "$dir/ca.crt"; fi
    if [ -x .venv/bin/python ]; then
        .venv/bin/python -m pip freeze --exclude-editable | grep -v '^torch==' >"$dir/constraints.txt"
    fi
}

# Stops early, with the numbers, where the engine's disk cannot hold a build of the service image
# (the last one ran out of space half way through copying its venv).
free_disk() {  # free_disk GB
    local root avail
    root=$(docker info -f '{{.DockerRootDir}}')
    avail=$(df -Pk "$root" | awk 'NR == 2 {print int($4 / 1048576)}')
    if [ "$avail" -lt "$1" ]; then
        say "only ${avail} GB free under $root; building the service image needs about $1 GB"
        docker system df >&2
        say "free space, e.g. 'docker image prune' (untagged images) or 'docker system prune'"
        exit 1
    fi
}

# A rebuild leaves the previous service image and its deps stage untagged. The deps stage is
# tagged (a cached build: seconds) so that its layers stay the cache of the next build, then
# the untagged images this Dockerfile made are removed; other untagged images are left alone.
tidy() {
    DOCKER_BUILDKIT=0 docker build -q --network host --target deps -t "${SERVICE_IMAGE%%:*}:deps" \
        --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VERSION="$TORCH_VERSION" . >/dev/null 2>&1 \
        || { say "tagging the deps stage failed"; exit 1; }
    docker image prune -f --filter label=io.t2i.image=service | tail -n 1 | sed 's/^/prepare: removed untagged: /' >&2
}

engine
BASE=${BASE_IMAGE:-$(public python:3.11-slim)}
REDIS=${REDIS_IMAGE:-$(public redis:7.2-alpine)}
PROMETHEUS=${PROMETHEUS_IMAGE:-$(public prom/prometheus:v2.53.0)}
if [ -z "$BASE" ] || [ -z "$REDIS" ] || [ -z "$PROMETHEUS" ]; then
    say "no image can be pulled: building from Debian's packages"
    local_base
fi
if [ -z "$REDIS" ]; then
    REDIS=t2i-redis:local
    build "$REDIS" deploy/docker/redis.Dockerfile --build-arg BASE_IMAGE="$LOCAL_BASE"
fi
if [ -z "$PROMETHEUS" ]; then
    PROMETHEUS=t2i-prometheus:local
    build "$PROMETHEUS" deploy/docker/prometheus.Dockerfile --build-arg BASE_IMAGE="$LOCAL_BASE"
fi
BASE=${BASE:-$LOCAL_BASE}
pip_inputs
free_disk 8
build "$SERVICE_IMAGE" Dockerfile --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VERSION="$TORCH_VERSION"
tidy
printf 'SERVICE_IMAGE=%s\nREDIS_IMAGE=%s\nPROMETHEUS_IMAGE=%s\n' \
    "$SERVICE_IMAGE" "$REDIS" "$PROMETHEUS" >build/compose.env
say "images: base $BASE, $(tr '\n' ' ' <build/compose.env)"
