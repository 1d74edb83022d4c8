#!/usr/bin/env bash
# Builds Stratum's container images as OCI archives, without a container daemon or a registry:
#
#   stratum-operator.oci.tar   localhost/stratum/operator:<version> and :dev
#   stratum-agent.oci.tar      localhost/stratum/agent:<version> and :dev
#   stratum-ntp-client.oci.tar localhost/stratum/ntp-client:<version> and :dev
#                              (e2e tenant workloads: chrony's chronyd and ntpsec's ntpdig)
#
# into ${STRATUM_IMAGES_DIR:-target/images}, then verifies them (--check alone only verifies):
# index names, labels, entrypoint, cmd and user (skopeo inspect); in the unpacked root
# filesystems (umoci unpack, chroot, never with CAP_SYS_TIME) the binaries are static and run;
# the agent, synchronized from the client image's chronyd -x, serves its stratumctl and the
# client image's chronyd -Q on 127.0.0.1; skopeo pushes each to a registry on 127.0.0.1.
#
# How: the operator and agent are static binaries (x86_64-unknown-linux-musl, release profile,
# --locked) on a root filesystem that this script provides (deploy/rootfs/<image>: /etc/passwd
# and /etc/group, nothing else), so there is no base image to pull. The NTP client image holds
# files extracted from Debian's own .debs (apt-get download + dpkg-deb -x, no maintainer
# scripts), plus every shared library ldd finds for them, from their own packages too. umoci
# (Debian) turns each root filesystem into a one-layer OCI image and writes its config
# (entrypoint, user, labels); tar packs the OCI layout into an archive. Everything is dated
# from the HEAD commit, so the same commit gives the same layers.
#
# Each archive's index.json lists the image twice, as <version> and as dev; the
# `io.containerd.image.name` annotation holds the full name, so `ctr -n k8s.io images import`
# creates both names, and the OCI ref name is the tag, so skopeo picks one with
# `oci-archive:<file>:<tag>`.
#
# Tools (installed only when missing): rustup's musl target, and from Debian musl-tools (ring
# compiles C), umoci, skopeo, binutils (readelf, strip), and docker-registry: the check pushes
# each image with skopeo to a registry it runs on 127.0.0.1 for the purpose. Environment:
#   STRATUM_IMAGES_DIR      output directory (default target/images in the repository)
#   CARGO_TARGET_DIR        cargo's target directory (the musl build is cached there)
#   SOURCE_DATE_EPOCH       image creation time (default: the HEAD commit's time)
#   STRATUM_IMAGE_SOURCE    the org.opencontainers.image.source label
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(realpath -m "${STRATUM_IMAGES_DIR:-$ROOT/target/images}")
TARGET_TRIPLE=x86_64-unknown-linux-musl
REGISTRY=localhost/stratum
SOURCE_URL=${STRATUM_IMAGE_SOURCE:-https://example.invalid/stratum}
IMAGES=(operator agent ntp-client)

START=$SECONDS
log() { printf '[images %4ds] %s\n' $((SECONDS - START)) "$*"; }
die() {
  printf '[images] FAILED: %s\n' "$*" >&2
  exit 1
}

usage() {
  cat <<EOF
usage: scripts/images.sh [--check]
  (no option)  build the three images into $OUT, then verify them
  --check      only verify the archives in $OUT
EOF
}

# --- facts about this build ---------------------------------------------------------------

workspace_version() {
  cargo metadata --no-deps --format-version 1 --manifest-path "$ROOT/Cargo.toml" |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "stratum-operator"))'
}

init_facts() {
  VERSION=$(workspace_version) || die "cannot read the workspace version"
  REVISION=$(git -C "$ROOT" rev-parse HEAD) || die "not a git checkout"
  # Uncommitted changes are in the binaries, so the revision label says so.
  if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
    REVISION=$REVISION-dirty
  fi
  EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct HEAD)}
  CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
}

archive_of() { printf '%s/stratum-%s.oci.tar' "$OUT" "$1"; }

# --- tools ----------------------------------------------------------------------------------

APT_UPDATED=0
apt_install() {
  if ((APT_UPDATED == 0)); then
    log "apt-get update"
    apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  # Never start a service on install (docker-registry would listen on every address).
  if [[ ! -x /usr/sbin/policy-rc.d ]] || ! grep -q 'exit 101' /usr/sbin/policy-rc.d; then
    printf '#!/bin/sh\n# Stratum: never start services on install.\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_tools() {
  local build=$1 missing=() binary
  declare -A packages=([umoci]=umoci [skopeo]=skopeo [readelf]=binutils [strip]=binutils
    [dpkg-deb]=dpkg [python3]=python3 [docker-registry]=docker-registry [curl]=curl)
  ((build)) && packages[musl-gcc]=musl-tools
  for binary in "${!packages[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || missing+=("${packages[$binary]}")
  done
  if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    apt_install "${missing[@]}"
  fi
  if ((build)) && ! rustup target list --installed | grep -qx "$TARGET_TRIPLE"; then
    log "rustup target add $TARGET_TRIPLE"
    rustup target add "$TARGET_TRIPLE"
  fi
}

# --- building -------------------------------------------------------------------------------

build_binaries() {
  local t=$SECONDS target
  # Where cargo puts them: ask cargo, so CARGO_TARGET_DIR and .cargo/config.toml both count.
  target=$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') || die "cargo metadata"
  MUSL_BIN=$target/$TARGET_TRIPLE/release
  log "cargo build --release --target $TARGET_TRIPLE: stratum-operator, stratum-agent, stratumctl (cached in $target)"
  # ring's C and assembly need a musl C compiler; Debian's musl-tools calls it musl-gcc.
  CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc} \
    cargo build --release --locked --target "$TARGET_TRIPLE" --manifest-path "$ROOT/Cargo.toml" \
    -p stratum-operator --bin stratum-operator -p stratum-agent --bin stratum-agent --bin stratumctl ||
    die "cargo build"
  log "binaries built in $((SECONDS - t))s"
}

# A static executable has no program interpreter (PT_INTERP) and no DT_NEEDED entries.
is_static() {
  ! readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter' &&
    ! readelf -dW "$1" 2>/dev/null | grep -q '(NEEDED)'
}

# Copies a static binary into a root filesystem, without symbols.
install_static() {
  local bin=$1 rootfs=$2
  [[ -x $MUSL_BIN/$bin ]] || die "$MUSL_BIN/$bin is missing"
  is_static "$MUSL_BIN/$bin" || die "$bin is not a static executable"
  install -D -m 0755 "$MUSL_BIN/$bin" "$rootfs/usr/local/bin/$bin"
  strip --strip-all "$rootfs/usr/local/bin/$bin"
}

rootfs_operator() {
  local rootfs=$1
  cp -a "$ROOT/deploy/rootfs/operator/." "$rootfs/"
  install_static stratum-operator "$rootfs"
}

rootfs_agent() {
  local rootfs=$1
  cp -a "$ROOT/deploy/rootfs/agent/." "$rootfs/"
  install_static stratum-agent "$rootfs"
  install_static stratumctl "$rootfs"
}

# The Debian packages of the NTP client image (TOP_PACKAGES), and the library packages they
# depend on, directly or through other libraries (LIB_PACKAGES): ldd must find every library
# of the image among them, never on this machine.
debian_packages() {
  local python deps=(--no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances)
  local direct=()
  python=$(apt-cache depends python3 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^python3\.[0-9]+$/ {print $2; exit}')
  [[ -n $python ]] || die "cannot find the python3.X package that python3 depends on (apt-get update?)"
  PYTHON=$python
  TOP_PACKAGES=(chrony ntpsec-ntpdig python3-ntp "$python-minimal" "lib$python-minimal"
    "lib$python-stdlib" busybox-static netbase)
  mapfile -t direct < <(apt-cache depends "${deps[@]}" "${TOP_PACKAGES[@]}" 2>/dev/null |
    awk '$1 ~ /Depends:$/ && $2 ~ /^(lib|zlib)/ {print $2}' | sort -u)
  mapfile -t LIB_PACKAGES < <(apt-cache depends --recurse "${deps[@]}" "${direct[@]}" 2>/dev/null |
    grep -E '^(lib|zlib)' | sort -u)
  ((${#LIB_PACKAGES[@]})) || die "no library packages found for ${TOP_PACKAGES[*]}"
}

# download_debs <dir> <stage> <package>...: fetches the packages' candidate .debs (kept in <dir>
# as a cache) and extracts them into <stage>, without running any maintainer script.
download_debs() {
  local debs=$1 stage=$2 package version file missing=() files=()
  shift 2
  mkdir -p "$debs"
  declare -A candidate=()
  while read -r package version; do
    candidate[$package]=$version
  done < <(apt-cache show --no-all-versions "$@" 2>/dev/null | awk '/^Package:/ {p = $2} /^Version:/ {print p, $2}')
  for package in "$@"; do
    version=${candidate[$package]:-}
    [[ -n $version ]] || die "Debian has no package $package (apt-get update?)"
    # apt-get download names the file package_version_arch.deb, with ':' as %3a.
    file=$(compgen -G "$debs/${package}_${version//:/%3a}_*.deb" | head -1) || true
    if [[ -n $file ]]; then
      files+=("$file")
    else
      missing+=("$package=$version")
    fi
  done
  if ((${#missing[@]})); then
    # apt's sandbox user cannot write into this directory, so the download runs as root.
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "${missing[@]}" >/dev/null) ||
      die "apt-get download ${missing[*]}"
    for package in "${missing[@]}"; do
      version=${package#*=} package=${package%%=*}
      file=$(compgen -G "$debs/${package}_${version//:/%3a}_*.deb" | head -1) || die "no .deb for $package"
      files+=("$file")
    done
  fi
  for file in "${files[@]}"; do
    dpkg-deb -x "$file" "$stage"
  done
}

# Copies stage/<path> to rootfs/<path> (directories recursively), dereferencing symlinks.
from_stage() {
  local stage=$1 rootfs=$2 path
  shift 2
  for path in "$@"; do
    [[ -e $stage$path ]] || die "$path is not in the Debian packages"
    mkdir -p "$rootfs$(dirname "$path")"
    cp -a "$stage$path" "$rootfs$path"
  done
}

# The extracted file at <path>, following symlinks inside the stage (Debian's links may be
# absolute, which must not lead out to this machine's files).
stage_file() {
  local stage=$1 path=$2 target
  for _ in 1 2 3 4 5 6 7 8; do
    if [[ -L $stage$path ]]; then
      target=$(readlink "$stage$path")
      [[ $target == /* ]] || target=$(dirname "$path")/$target
      path=$target
    elif [[ -f $stage$path ]]; then
      printf '%s\n' "$stage$path"
      return 0
    else
      return 1
    fi
  done
  return 1
}

# Every ELF file's shared libraries (ldd, preferring the extracted packages), copied in.
copy_libraries() {
  local stage=$1 rootfs=$2 libpath file lib dest src from_host=()
  libpath=$stage/lib/x86_64-linux-gnu:$stage/usr/lib/x86_64-linux-gnu:$stage/usr/lib/x86_64-linux-gnu/ntp
  while IFS= read -r file; do
    [[ $(head -c 4 "$file" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] || continue
    while IFS= read -r lib; do
      case $lib in
        "$stage"/*) dest=${lib#"$stage"} ;;
        /*) dest=$lib ;;
        *) die "$file: $lib" ;;
      esac
      [[ -e $rootfs$dest ]] && continue
      src=$(stage_file "$stage" "$dest") || {
        src=$lib
        from_host+=("$lib")
      }
      mkdir -p "$rootfs$(dirname "$dest")"
      cp -L "$src" "$rootfs$dest"
    done < <(LD_LIBRARY_PATH=$libpath ldd "$file" 2>&1 | awk '
      /not found/ {print "not found: " $1; next}
      /=>/ && $3 ~ /^\// {print $3; next}
      $1 ~ /^\// {print $1}')
  done < <(find "$rootfs" -type f \( -perm -u+x -o -name '*.so*' \))
  HOST_LIBS=()
  ((${#from_host[@]})) && mapfile -t HOST_LIBS < <(printf '%s\n' "${from_host[@]}" | sort -u)
  return 0
}

rootfs_ntp_client() {
  local rootfs=$1 stage=$WORK/ntp-stage debs=$OUT/.cache/debs applet pkg
  mkdir -p "$stage"
  debian_packages
  log "apt-get download, dpkg-deb -x: ${TOP_PACKAGES[*]} and ${#LIB_PACKAGES[@]} library packages (cached in ${debs#"$ROOT"/})"
  download_debs "$debs" "$stage" "${TOP_PACKAGES[@]}" "${LIB_PACKAGES[@]}"
  # Debian 12's merged /usr: /bin, /sbin and /lib are links into /usr.
  mkdir -p "$rootfs/usr/bin" "$rootfs/usr/sbin" "$rootfs/usr/lib" "$rootfs/usr/lib64" "$rootfs/etc"
  ln -s usr/bin "$rootfs/bin"
  ln -s usr/sbin "$rootfs/sbin"
  ln -s usr/lib "$rootfs/lib"
  ln -s usr/lib64 "$rootfs/lib64"
  from_stage "$stage" "$rootfs" /usr/sbin/chronyd /usr/bin/ntpdig "/usr/bin/$PYTHON" \
    "/usr/lib/$PYTHON" /usr/lib/python3/dist-packages/ntp /usr/lib/x86_64-linux-gnu/ntp \
    /etc/services /etc/protocols
  cp -a "$stage/bin/busybox" "$rootfs/usr/bin/busybox"
  ln -s "$PYTHON" "$rootfs/usr/bin/python3"
  # A shell and a few tools, so test pods can idle and be exec'd into.
  for applet in sh sleep cat ls env echo true false; do
    ln -s busybox "$rootfs/usr/bin/$applet"
  done
  # What no NTP client needs: tests, GUI and packaging parts of the standard library, and
  # the extension modules that would pull in sqlite, Berkeley DB, curses and readline.
  rm -rf "$rootfs/usr/lib/$PYTHON"/{test,idlelib,tkinter,turtledemo,ensurepip,lib2to3,pydoc_data,venv}
  rm -f "$rootfs/usr/lib/$PYTHON"/lib-dynload/{_sqlite3,_dbm,_gdbm,_curses,_curses_panel,readline,nis}.*
  cp -a "$ROOT/deploy/rootfs/ntp-client/." "$rootfs/"
  mkdir -p "$rootfs/run/chrony" "$rootfs/var/lib/chrony" "$rootfs/tmp"
  chmod 1777 "$rootfs/tmp"
  chown 100:101 "$rootfs/run/chrony" "$rootfs/var/lib/chrony"
  copy_libraries "$stage" "$rootfs"
  ((${#HOST_LIBS[@]} == 0)) || die "libraries outside the downloaded packages: ${HOST_LIBS[*]}"
  # The licences of what the image redistributes.
  for pkg in "${TOP_PACKAGES[@]}" "${LIB_PACKAGES[@]}"; do
    pkg=/usr/share/doc/$pkg/copyright
    if [[ -f $stage$pkg && ! -L $stage$pkg ]]; then
      mkdir -p "$rootfs$(dirname "$pkg")"
      cp "$stage$pkg" "$rootfs$pkg"
    fi
  done
  return 0
}

# make_image <name> <rootfs> <user> <entrypoint|""> <cmd|""> <port|""> <description> <licenses>
# Writes $(archive_of name) from the root filesystem.
make_image() {
  local name=$1 rootfs=$2 user=$3 entrypoint=$4 cmd=$5 port=$6 description=$7 licenses=$8
  local layout=$WORK/$name-layout bundle=$WORK/$name-bundle ref=$REGISTRY/$name archive
  local labels=(
    "org.opencontainers.image.title=stratum-$name"
    "org.opencontainers.image.description=$description"
    "org.opencontainers.image.version=$VERSION"
    "org.opencontainers.image.revision=$REVISION"
    "org.opencontainers.image.source=$SOURCE_URL"
    "org.opencontainers.image.licenses=$licenses"
    "org.opencontainers.image.created=$CREATED"
  )
  local config=(--created "$CREATED" --author "Stratum"
    --history.created "$CREATED" --history.created_by "scripts/images.sh: configure"
    --config.user "$user" --config.workingdir /
    --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
  local label
  for label in "${labels[@]}"; do
    config+=(--config.label "$label" --manifest.annotation "$label")
  done
  [[ -n $entrypoint ]] && config+=(--config.entrypoint "$entrypoint")
  [[ -n $cmd ]] && config+=(--config.cmd "$cmd")
  [[ -n $port ]] && config+=(--config.exposedports "$port")

  # Same time on every file, so the layer depends only on the content.
  find "$rootfs" -exec touch -h -d "@$EPOCH" {} +
  umoci init --layout "$layout"
  umoci new --image "$layout:build"
  umoci unpack --image "$layout:build" "$bundle" >/dev/null
  cp -a "$rootfs/." "$bundle/rootfs/"
  touch -h -d "@$EPOCH" "$bundle/rootfs"
  umoci repack --image "$layout:build" --history.created "$CREATED" \
    --history.created_by "scripts/images.sh: root filesystem" "$bundle"
  umoci config --image "$layout:build" "${config[@]}"
  umoci tag --image "$layout:build" "$VERSION"
  umoci tag --image "$layout:build" dev
  umoci rm --image "$layout:build"
  umoci gc --layout "$layout"
  # containerd names an imported image after this annotation (the OCI ref name stays the tag).
  python3 - "$layout/index.json" "$ref" <<'PY'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
entries = sorted(index["manifests"], key=lambda m: m["annotations"]["org.opencontainers.image.ref.name"])
for m in entries:
    tag = m["annotations"]["org.opencontainers.image.ref.name"]
    m["annotations"]["io.containerd.image.name"] = f"{ref}:{tag}"
index["manifests"] = entries
with open(path, "w") as f:
    json.dump(index, f, separators=(",", ":"), sort_keys=True)
PY
  touch -d "@$EPOCH" "$layout/index.json" "$layout/oci-layout"
  archive=$(archive_of "$name")
  tar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner --format=ustar \
    -C "$layout" -cf "$archive.tmp" oci-layout index.json blobs
  mv "$archive.tmp" "$archive"
}

build() {
  local t
  init_facts
  log "version $VERSION, revision $REVISION, created $CREATED"
  mkdir -p "$OUT"
  WORK=$OUT/.work
  rm -rf "$WORK"
  mkdir -p "$WORK"
  build_binaries

  t=$SECONDS
  mkdir -p "$WORK/operator-rootfs" "$WORK/agent-rootfs" "$WORK/ntp-client-rootfs"
  rootfs_operator "$WORK/operator-rootfs"
  make_image operator "$WORK/operator-rootfs" 65532:65532 /usr/local/bin/stratum-operator "" 8080/tcp \
    "Stratum operator: reconciles TimeServices and TenantTimePolicies into NTP agent DaemonSets" \
    Apache-2.0
  log "operator image in $((SECONDS - t))s"

  t=$SECONDS
  rootfs_agent "$WORK/agent-rootfs"
  # Root, as in deploy/Dockerfile.agent: clock_adjtime needs CAP_SYS_TIME in the effective set.
  make_image agent "$WORK/agent-rootfs" 0:0 /usr/local/bin/stratum-agent run 9123/tcp \
    "Stratum node agent: disciplines the node clock from upstream NTP and serves NTP to tenants" \
    Apache-2.0
  log "agent image in $((SECONDS - t))s"

  t=$SECONDS
  rootfs_ntp_client "$WORK/ntp-client-rootfs"
  make_image ntp-client "$WORK/ntp-client-rootfs" 0:0 "" sh 123/udp \
    "Test NTP clients from Debian: chronyd (use -Q) and ntpdig; not part of Stratum's product" \
    "GPL-2.0-only AND BSD-2-Clause AND NTP AND PSF-2.0 AND LGPL-2.1-or-later"
  log "ntp-client image in $((SECONDS - t))s"
  rm -rf "$WORK"
}

# --- verification ---------------------------------------------------------------------------

# Runs a command inside a root filesystem, never with CAP_SYS_TIME.
in_rootfs() {
  local rootfs=$1
  shift
  setpriv --bounding-set=-sys_time --inh-caps=-sys_time chroot "$rootfs" "$@"
}

# check_config <name> <config.json> <user> <entrypoint JSON> <cmd JSON>
check_config() {
  python3 - "$@" "$VERSION" "$CREATED" "$REVISION" <<'PY'
import json, sys
name, path, user, entrypoint, cmd, version, created, revision = sys.argv[1:]
with open(path) as f:
    image = json.load(f)
config = image.get("config", {})
labels = config.get("Labels") or {}
want = {
    "org.opencontainers.image.title": f"stratum-{name}",
    "org.opencontainers.image.version": version,
    "org.opencontainers.image.revision": revision,
    "org.opencontainers.image.created": created,
}
problems = []
for key, value in want.items():
    if labels.get(key) != value:
        problems.append(f"label {key} is {labels.get(key)!r}, want {value!r}")
for key in ("org.opencontainers.image.source", "org.opencontainers.image.licenses",
            "org.opencontainers.image.description"):
    if not labels.get(key):
        problems.append(f"label {key} is missing")
if image.get("created") != created:
    problems.append(f"created is {image.get('created')!r}, want {created!r}")
if config.get("User") != user:
    problems.append(f"user is {config.get('User')!r}, want {user!r}")
if config.get("Entrypoint") != json.loads(entrypoint):
    problems.append(f"entrypoint is {config.get('Entrypoint')!r}, want {entrypoint}")
if config.get("Cmd") != json.loads(cmd):
    problems.append(f"cmd is {config.get('Cmd')!r}, want {cmd}")
if (image.get("os"), image.get("architecture")) != ("linux", "amd64"):
    problems.append(f"platform is {image.get('os')}/{image.get('architecture')}")
for p in problems:
    print(f"  {name}: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
}

# The archive's index: both names, one manifest, containerd's name annotation.
check_index() {
  local name=$1 index=$2
  python3 - "$index" "$REGISTRY/$name" "$VERSION" <<'PY'
import json, sys
path, ref, version = sys.argv[1:]
with open(path) as f:
    manifests = json.load(f)["manifests"]
names = sorted(m["annotations"].get("io.containerd.image.name", "") for m in manifests)
tags = sorted(m["annotations"].get("org.opencontainers.image.ref.name", "") for m in manifests)
want = sorted([f"{ref}:{version}", f"{ref}:dev"])
ok = names == want and tags == sorted([version, "dev"]) and len({m["digest"] for m in manifests}) == 1
if not ok:
    print(f"  index.json: names {names}, tags {tags}, want {want} on one manifest", file=sys.stderr)
sys.exit(0 if ok else 1)
PY
}

check_image() {
  local name=$1 user=$2 entrypoint=$3 cmd=$4 archive dir config rootfs passwd uid
  archive=$(archive_of "$name")
  [[ -f $archive ]] || die "$archive is missing (run make images)"
  dir=$CHECK/$name
  mkdir -p "$dir/layout"
  tar -xf "$archive" -C "$dir/layout" || die "$archive is not a tar archive"
  check_index "$name" "$dir/layout/index.json" || die "$name: index.json"
  # skopeo reads the archive as a registry push would (oci-archive transport), by either tag.
  skopeo inspect --config "oci-archive:$archive:$VERSION" >"$dir/config.json" ||
    die "$name: skopeo inspect oci-archive:$archive:$VERSION"
  skopeo inspect "oci-archive:$archive:dev" >/dev/null || die "$name: skopeo inspect of the dev tag"
  check_config "$name" "$dir/config.json" "$user" "$entrypoint" "$cmd" || die "$name: image config (built from another checkout? make images rebuilds)"
  umoci unpack --image "$dir/layout:$VERSION" "$dir/bundle" >/dev/null || die "$name: umoci unpack"
  rootfs=$dir/bundle/rootfs
  # The image's user exists in its /etc/passwd.
  uid=${user%%:*}
  passwd=$rootfs/etc/passwd
  if [[ ! -f $passwd ]] || ! awk -F: -v uid="$uid" '$3 == uid {found=1} END {exit !found}' "$passwd"; then
    die "$name: uid $uid has no /etc/passwd entry"
  fi
}

# Runs a command in the unpacked root filesystem and checks its output.
expect_output() {
  local name=$1 pattern=$2 out
  shift 2
  out=$(in_rootfs "$CHECK/$name/bundle/rootfs" "$@" 2>&1) || die "$name: '$*' failed: $out"
  grep -Eq -e "$pattern" <<<"$out" || die "$name: '$*' printed '$out', not /$pattern/"
  log "  $name: $* -> $(head -1 <<<"$out")"
}

# Stops what the check started (by process id) and removes its files.
cleanup_check() {
  local pid
  for pid in $REGISTRY_PID $SERVER_PID $AGENT_PID; do
    kill "$pid" 2>/dev/null || true
  done
  rm -rf "$CHECK"
}

check() {
  local name bin
  # After a build, check what was built: the tree may have changed since (an edit while the
  # binaries compiled), and the labels carry the revision the build saw.
  [[ -n ${VERSION:-} ]] || init_facts
  ensure_tools 0
  CHECK=$(mktemp -d)
  REGISTRY_PID='' SERVER_PID='' AGENT_PID=''
  trap cleanup_check EXIT
  log "verifying the archives in $OUT (version $VERSION, revision $REVISION)"
  check_image operator 65532:65532 '["/usr/local/bin/stratum-operator"]' 'null'
  check_image agent 0:0 '["/usr/local/bin/stratum-agent"]' '["run"]'
  check_image ntp-client 0:0 'null' '["sh"]'
  # Static: no interpreter and no libraries, and they run in a root filesystem holding nothing
  # else. The agent only prints its help: nothing here opens a clock.
  for bin in operator/stratum-operator agent/stratum-agent agent/stratumctl; do
    is_static "$CHECK/${bin%%/*}/bundle/rootfs/usr/local/bin/${bin#*/}" || die "$bin is not static"
  done
  expect_output operator "^stratum-operator $VERSION\$" /usr/local/bin/stratum-operator --version
  expect_output operator 'leader-election' /usr/local/bin/stratum-operator --help
  expect_output agent "^stratum-agent $VERSION\$" /usr/local/bin/stratum-agent --version
  expect_output agent '--config-map' /usr/local/bin/stratum-agent run --help
  expect_output agent "^stratumctl $VERSION\$" /usr/local/bin/stratumctl --version
  # The real NTP clients start from the image's own libraries and Python (version output only;
  # chronyd -v exits before it reads a config or opens a socket).
  expect_output ntp-client '^chronyd \(chrony\) version 4' /usr/sbin/chronyd -v
  expect_output ntp-client '^ntpdig ntpsec-1\.' /usr/bin/ntpdig --version
  expect_output ntp-client '^ok$' /bin/sh -c 'echo ok'
  check_served_time
  check_push
  log "all three images verified"
}

# The three images together, on 127.0.0.1 only and with no clock touched: chronyd -x from the
# client image is the upstream; the agent image's static agent (simulated clock, 0.3 s off, no
# API server) synchronizes from it and serves a tenant port through its musl recvmmsg and
# sendmmsg path; its stratumctl queries that port, and the client image's chronyd -Q too.
check_served_time() {
  local client=$CHECK/ntp-client/bundle/rootfs agent=$CHECK/agent/bundle/rootfs
  local upstream tenant metrics status out reply=""
  upstream=$(free_port SOCK_DGRAM) tenant=$(free_port SOCK_DGRAM)
  metrics=$(free_port SOCK_STREAM) status=$(free_port SOCK_STREAM)
  mkdir -p "$client/tmp/server" "$agent/tmp/check"
  printf 'port %s\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 2\ncmdport 0\npidfile /tmp/server/chronyd.pid\n' \
    "$upstream" >"$client/tmp/server/chrony.conf"
  # setpriv and chroot exec, so $! is the server's own pid.
  setpriv --bounding-set=-sys_time --inh-caps=-sys_time chroot "$client" \
    /usr/sbin/chronyd -x -d -u root -f /tmp/server/chrony.conf >"$CHECK/chronyd-server.log" 2>&1 &
  SERVER_PID=$!
  python3 - "$ROOT/agent/tests/data/agent-config.json" "$upstream" "$tenant" >"$agent/tmp/check/agent.json" <<'PY'
import json, sys
path, upstream, tenant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path) as f:
    config = json.load(f)
config["upstreams"][0]["port"] = upstream
config["serving"]["tenants"] = [{
    "id": "images/check", "port": tenant, "allowed": ["127.0.0.0/8"], "denied": [],
    "rateLimit": {"clientIntervalSeconds": 0.001, "clientBurst": 1000, "kissOfDeath": False},
}]
json.dump(config, sys.stdout)
PY
  STRATUM_DENY_SYSTEM_CLOCK=1 setpriv --bounding-set=-sys_time --inh-caps=-sys_time chroot "$agent" \
    /usr/local/bin/stratum-agent run --node-name images-check --clock simulated --sim-offset 0.3 \
    --no-report --config /tmp/check/agent.json --server-workers 1 --state-dir /tmp/check \
    --metrics-addr "127.0.0.1:$metrics" --status-addr "127.0.0.1:$status" >"$CHECK/agent.log" 2>&1 &
  AGENT_PID=$!
  # Synchronized: stratum 3 (chronyd's 2 + 1) and a leap indicator other than unsynchronized.
  for _ in $(seq 120); do
    reply=$(in_rootfs "$agent" /usr/local/bin/stratumctl --json query "127.0.0.1:$tenant" --timeout 0.5 2>/dev/null) &&
      python3 -c 'import json, sys; r = json.load(sys.stdin); sys.exit(0 if r["stratum"] == 3 and "unsync" not in r["leap"].lower() else 1)' <<<"$reply" &&
      break
    reply=""
    sleep 0.5
  done
  [[ -n $reply ]] || die "agent: never served synchronized time on 127.0.0.1:$tenant: $(tail -5 "$CHECK/agent.log")"
  log "  agent: synchronized from chronyd, serves 127.0.0.1:$tenant: $(python3 -c 'import json, sys; r = json.load(sys.stdin); print("stratum %d, offset %+.6f s" % (r["stratum"], r["offsetSeconds"]))' <<<"$reply")"
  out=$(timeout 20 setpriv --bounding-set=-sys_time --inh-caps=-sys_time chroot "$client" \
    /usr/sbin/chronyd -Q -t 10 "server 127.0.0.1 port $tenant iburst maxsamples 1" 2>&1) || true
  grep -Eq 'System clock wrong by -?[0-9.]+ seconds \(ignored\)' <<<"$out" ||
    die "ntp-client: chronyd -Q got no time from the agent on 127.0.0.1:$tenant: $out"
  log "  ntp-client: chronyd -Q from the agent -> $(grep -Eo 'System clock wrong by -?[0-9.]+ seconds' <<<"$out")"
  kill "$AGENT_PID" "$SERVER_PID" 2>/dev/null
  wait "$AGENT_PID" "$SERVER_PID" 2>/dev/null || true
  AGENT_PID='' SERVER_PID=''
}

free_port() {
  python3 -c "import socket, sys; s = socket.socket(socket.AF_INET, socket.$1); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1]); s.close()"
}

# The push path: skopeo copies each archive to a registry on loopback (started here, stopped
# at the end), and the registry serves the manifest the archive holds, byte for byte.
check_push() {
  local dir=$CHECK/registry port name archive want got
  port=$(free_port SOCK_STREAM)
  mkdir -p "$dir/storage"
  printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$dir/storage" "$port" >"$dir/config.yml"
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  REGISTRY_PID=$!
  for _ in $(seq 50); do
    curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null || die "the loopback registry did not start: $(cat "$dir/registry.log")"
  for name in "${IMAGES[@]}"; do
    archive=$(archive_of "$name")
    skopeo copy --quiet --dest-tls-verify=false "oci-archive:$archive:$VERSION" \
      "docker://127.0.0.1:$port/stratum/$name:$VERSION" || die "$name: skopeo copy to a registry"
    want=$(tar -xOf "$archive" index.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["digest"])')
    got=$(skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://127.0.0.1:$port/stratum/$name:$VERSION") ||
      die "$name: skopeo inspect of the pushed image"
    [[ $got == "$want" ]] || die "$name: the registry holds $got, the archive $want"
    log "  $name: pushed with skopeo to 127.0.0.1:$port, digest unchanged"
  done
  kill "$REGISTRY_PID"
  wait "$REGISTRY_PID" 2>/dev/null || true
  REGISTRY_PID=
}

summary() {
  local name archive digest size
  printf '\n%-46s %-73s %s\n' "image" "manifest digest" "archive"
  for name in "${IMAGES[@]}"; do
    archive=$(archive_of "$name")
    digest=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["manifests"][0]["digest"])' \
      < <(tar -xOf "$archive" index.json))
    size=$(du -h "$archive" | cut -f1)
    printf '%-46s %-73s %s %s\n' "$REGISTRY/$name:$VERSION (+ :dev)" "$digest" "$size" "${archive#"$ROOT"/}"
  done
}

# apt-get, chroot, and root-owned files in the images.
((EUID == 0)) || [[ ${1:-} == -h || ${1:-} == --help ]] || die "run as root (apt-get, chroot, file ownership)"

case ${1:-} in
  "")
    ensure_tools 1
    build
    check
    summary
    ;;
  --check)
    check
    summary
    ;;
  -h | --help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
