#!/bin/sh
# wiregate VM bootstrap: join this machine to a wiregate mesh with one command.
#
#   curl -fsSL https://GATEWAY/bootstrap.sh | sudo sh -s -- \
#       --server https://GATEWAY --auth-key file:/root/wiregate.key
#
# Installs WireGuard (the kernel module when `modprobe wireguard` works, else
# wireguard-go), the wiregate agent in a virtualenv (/opt/wiregate, linked from
# /usr/local/bin/wiregate), /etc/wiregate/agent.toml and a hardened systemd unit,
# waits for the clock to be synchronised, then enables and starts the agent.
# Running it again changes only what differs; --uninstall removes everything it
# installed (packages from the distribution are kept and listed).
#
# Options:
#   --server URL              the gateway (https://...; required to install)
#   --auth-key file:PATH      enrollment key in a file, or env:VAR; the key itself on
#                             the command line is refused (ps and shell history show it)
#   --workload-token file:PATH  instead of (or with) --auth-key: a workload identity token
#                             (OIDC, audience = the gateway) copied to
#                             /etc/wiregate/workload-token (0600); the agent enrolls with
#                             it (workload_token in agent.toml), re-reading the file at each
#                             attempt, so a token renewed in place is picked up
#   --package SPEC            pip requirement or wheel path/URL, installed with pip's own
#                             configuration (default: the gateway's own version from the
#                             gateway itself: SERVER/simple/, every wheel pinned by
#                             SERVER/wheels/requirements-$(uname -m).txt with its sha256,
#                             no other index)
#   --find-links DIR          install offline from this wheelhouse (pip --no-index)
#   --ca-file PATH            PEM CA that signed the gateway's certificate (a private CA):
#                             copied to /etc/wiregate/ca.pem, trusted for the downloads
#                             from the gateway and written as ca_file into agent.toml
#   --interface NAME          WireGuard interface (default wg0)
#   --hostname NAME           device name (default: this host's name)
#   --uninstall               stop and remove the agent, its files and its interface
#   --dry-run                 print the plan; change nothing
#
# Environment, for tests and unusual hosts (defaults are the real things):
#   WIREGATE_ROOT             install below this directory instead of / (the unit then
#                             points into it too)
#   WIREGATE_OS_RELEASE       the os-release file (default /etc/os-release)
#   WIREGATE_SYSTEMCTL        systemctl command; when set, a service manager is assumed
#                             even if systemd is not PID 1; set but empty: none is used
#   WIREGATE_APT_GET, WIREGATE_DNF  package manager commands (default apt-get, dnf or yum)
#   WIREGATE_MODPROBE         modprobe command (default modprobe)
#   WIREGATE_PYTHON           Python 3.11+ used to create the virtualenv (default python3)
#   WIREGATE_TIMESYNC_TIMEOUT seconds to wait for time synchronisation (default 60)
#   WIREGATE_ENROLL_TIMEOUT   seconds to wait for the first enrollment (default 90); a
#                             first install whose enrollment fails is removed again
#
# Everything happens inside main(), called on the last line: a truncated download
# defines an incomplete function and runs nothing.

main() {
    set -eu
    umask 077

    PROG=wiregate-bootstrap
    UNIT_NAME=wiregate-agent.service

    say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
    warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
    die() {
        printf '%s: error: %s\n' "$PROG" "$1" >&2
        [ -z "${2:-}" ] || printf '%s: hint: %s\n' "$PROG" "$2" >&2
        exit "${3:-2}"
    }
    have() { command -v "$1" >/dev/null 2>&1; }

    # step DESCRIPTION: print what is about to change; in --dry-run only print it and
    # return 1 so that the caller skips the change.
    step() {
        if [ "$DRY_RUN" = yes ]; then
            printf 'would: %s\n' "$*"
            return 1
        fi
        say "$*"
        CHANGED=yes
        return 0
    }

    usage() {
        cat <<'EOF'
usage: bootstrap.sh --server URL --auth-key file:PATH|env:VAR [options]
       bootstrap.sh --server URL --workload-token file:PATH [options]
       bootstrap.sh --uninstall [--dry-run]
options: --workload-token file:PATH  --package SPEC  --find-links DIR  --ca-file PATH
         --interface NAME  --hostname NAME  --dry-run  --uninstall  --help
EOF
    }

    # ------------------------------------------------------------------ arguments

    need_value() {
        [ "$2" -ge 2 ] || die "$1 needs a value" "see --help"
    }

    parse_args() {
        SERVER='' AUTH_KEY='' WORKLOAD_TOKEN='' PACKAGE='' FIND_LINKS=''
        IFACE='' HOSTNAME_OPT='' UNINSTALL=no DRY_RUN=no FROM_GATEWAY=no
        CA_FILE=''
        while [ $# -gt 0 ]; do
            opt=$1
            case $opt in
                --*=*)
                    value=${opt#*=}
                    opt=${opt%%=*}
                    shift
                    set -- "$opt" "$value" "$@"
                    ;;
            esac
            case $opt in
                --server) need_value "$opt" $#; SERVER=$2; shift 2 ;;
                --auth-key) need_value "$opt" $#; AUTH_KEY=$2; shift 2 ;;
                --workload-token) need_value "$opt" $#; WORKLOAD_TOKEN=$2; shift 2 ;;
                --package) need_value "$opt" $#; PACKAGE=$2; shift 2 ;;
                --find-links) need_value "$opt" $#; FIND_LINKS=$2; shift 2 ;;
                --interface) need_value "$opt" $#; IFACE=$2; shift 2 ;;
                --hostname) need_value "$opt" $#; HOSTNAME_OPT=$2; shift 2 ;;
                --ca-file) need_value "$opt" $#; CA_FILE=$2; shift 2 ;;
                --uninstall) UNINSTALL=yes; shift ;;
                --dry-run) DRY_RUN=yes; shift ;;
                -h | --help) usage; exit 0 ;;
                *) die "unknown option: $opt" "see --help" ;;
            esac
        done
    }

    check_source() { # check_source OPTION VALUE: file:PATH (readable, non-empty) or env:VAR
        case $2 in
            file:?*)
                src=${2#file:}
                if [ ! -f "$src" ] || [ ! -r "$src" ]; then die "$1: cannot read $src"; fi
                [ -s "$src" ] || die "$1: $src is empty"
                ;;
            env:?*)
                [ "$1" = --auth-key ] || die "$1 must be file:PATH"
                var=${2#env:}
                case $var in
                    [A-Za-z_]*) ;;
                    *) die "$1: $var is not a variable name" ;;
                esac
                case $var in *[!A-Za-z0-9_]*) die "$1: $var is not a variable name" ;; esac
                eval "val=\${$var:-}"
                [ -n "$val" ] || die "$1: the environment variable $var is empty or unset"
                ;;
            *)
                die "$1 takes file:PATH or env:VAR, not the secret itself" \
                    "a secret on the command line is visible in ps and shell history; put it in a 0600 file"
                ;;
        esac
    }

    check_name() { # check_name OPTION VALUE MAXLEN
        case $2 in
            '' | *[!A-Za-z0-9._-]*) die "$1: '$2' may use only letters, digits, '.', '_' and '-'" ;;
        esac
        [ "${#2}" -le "$3" ] || die "$1: '$2' is longer than $3 characters"
    }

    validate_args() {
        case $ROOT in
            /*) ;;
            *) die "WIREGATE_ROOT must be an absolute path" ;;
        esac
        case $ROOT in *[\"\\\ ]* | *"
"*) die "WIREGATE_ROOT must not contain quotes, backslashes or spaces" ;; esac
        [ "$UNINSTALL" = yes ] && return 0
        [ -n "$SERVER" ] || die "--server URL is required" "e.g. --server https://gateway.example.com"
        case $SERVER in
            https://?* | http://?*) ;;
            *) die "--server must be an http:// or https:// URL, not '$SERVER'" ;;
        esac
        case $SERVER in *[\"\\\'\ \	]* | *"
"*) die "--server must not contain quotes, backslashes or spaces" ;; esac
        case $SERVER in http://*) warn "--server is not https: the enrollment key crosses the network in clear" ;; esac
        [ -n "$AUTH_KEY" ] || [ -n "$WORKLOAD_TOKEN" ] ||
            die "--auth-key file:PATH (or env:VAR) is required, or --workload-token file:PATH" \
                "create one on the gateway: wiregate admin keys create --tags tag:vm"
        [ -z "$AUTH_KEY" ] || check_source --auth-key "$AUTH_KEY"
        [ -z "$WORKLOAD_TOKEN" ] || check_source --workload-token "$WORKLOAD_TOKEN"
        [ -z "$IFACE" ] || check_name --interface "$IFACE" 15
        [ -z "$HOSTNAME_OPT" ] || check_name --hostname "$HOSTNAME_OPT" 63
        [ -z "$CA_FILE" ] || { [ -f "$CA_FILE" ] && [ -r "$CA_FILE" ]; } ||
            die "--ca-file: cannot read $CA_FILE"
        [ -z "$CA_FILE" ] || grep -q -- '-----BEGIN CERTIFICATE-----' "$CA_FILE" ||
            die "--ca-file: $CA_FILE holds no PEM certificate"
        [ -z "$FIND_LINKS" ] || [ -d "$FIND_LINKS" ] || die "--find-links: $FIND_LINKS is not a directory"
        case $PACKAGE in -*) die "--package must be a pip requirement or a wheel, not '$PACKAGE'" ;; esac
        # without --package and --find-links: the gateway's own wheelhouse
        [ -n "$PACKAGE" ] || [ -n "$FIND_LINKS" ] || FROM_GATEWAY=yes
        PACKAGE=${PACKAGE:-wiregate}
    }

    # ------------------------------------------------------------------ the host

    detect_distro() {
        os_release=${WIREGATE_OS_RELEASE:-/etc/os-release}
        [ -r "$os_release" ] || die "cannot read $os_release: unknown distribution" \
            "supported: Debian, Ubuntu, RHEL, CentOS, Rocky, AlmaLinux, Fedora"
        # read, not sourced: only ID and ID_LIKE, quotes dropped
        ID=$(sed -n 's/^ID=//p' "$os_release" | tr -d "\"'" | head -n 1)
        ID_LIKE=$(sed -n 's/^ID_LIKE=//p' "$os_release" | tr -d "\"'" | head -n 1)
        DISTRO=''
        for id in $ID $ID_LIKE; do
            case $id in
                debian | ubuntu) DISTRO=debian; break ;;
                rhel | centos | rocky | almalinux | alma | fedora) DISTRO=rhel; break ;;
            esac
        done
        [ -n "$DISTRO" ] || die "unsupported distribution '${ID:-unknown}' (from $os_release)" \
            "supported: Debian, Ubuntu, RHEL, CentOS, Rocky, AlmaLinux, Fedora; install wireguard-tools and the agent by hand"
        PKG=''
        if [ "$DISTRO" = debian ]; then
            PKG=${WIREGATE_APT_GET:-apt-get}
        elif [ -n "${WIREGATE_DNF:-}" ]; then
            PKG=$WIREGATE_DNF
        elif have dnf; then
            PKG=dnf
        else
            PKG=yum
        fi
        say "distribution: ${ID:-?} (${DISTRO} family, packages with ${PKG##*/})"
    }

    kernel_wireguard() {
        [ -d /sys/module/wireguard ] && return 0
        ${WIREGATE_MODPROBE:-modprobe} wireguard >/dev/null 2>&1
    }

    python_ok() { # python_ok [PYTHON]: 3.11 or newer, with venv and ensurepip
        "${1:-$PY}" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
    }

    # pick_python: WIREGATE_PYTHON, else the first of python3, python3.13 .. python3.11
    # that is new enough (RHEL 8/9 ship an older python3 and python3.11 beside it)
    pick_python() {
        if [ -n "${WIREGATE_PYTHON:-}" ]; then
            python_ok
            return
        fi
        for candidate in python3 python3.13 python3.12 python3.11; do
            if have "$candidate" && python_ok "$candidate"; then
                PY=$candidate
                return 0
            fi
        done
        return 1
    }

    install_packages() {
        missing=''
        have wg || missing="$missing wireguard-tools"
        if ! have ip; then
            if [ "$DISTRO" = debian ]; then missing="$missing iproute2"; else missing="$missing iproute"; fi
        fi
        if kernel_wireguard; then
            BACKEND=kernel
        else
            BACKEND=userspace
            have wireguard-go || missing="$missing wireguard-go"
        fi
        if ! pick_python; then
            if [ "$DISTRO" = debian ]; then missing="$missing python3 python3-venv"; else missing="$missing python3.11"; fi
        fi
        say "WireGuard: $BACKEND backend"
        if [ -z "$missing" ]; then
            say "packages: all present"
            return 0
        fi
        step "install packages:$missing" || return 0
        # shellcheck disable=SC2086 # word splitting of the package list is wanted
        if [ "$DISTRO" = debian ]; then
            DEBIAN_FRONTEND=noninteractive $PKG update -q
            DEBIAN_FRONTEND=noninteractive $PKG install -y -q --no-install-recommends $missing
        else
            $PKG install -y -q $missing ||
                die "could not install$missing" "wireguard-go may need EPEL on RHEL-family systems without the wireguard module"
        fi
        mkdirs "$R/var/lib/wiregate"
        # shellcheck disable=SC2086 # one package a line
        printf '%s\n' $missing >>"$R/var/lib/wiregate/bootstrap-packages"
        pick_python ||
            die "no Python 3.11+ with venv and ensurepip after installing packages" "set WIREGATE_PYTHON to one"
    }

    # ------------------------------------------------------------------ files

    mkdirs() { # mkdirs DIR...: create missing directories, remembering which ones we made
        for d in "$@"; do
            missing_dirs=''
            p=$d
            while [ ! -d "$p" ]; do
                missing_dirs="$p $missing_dirs"
                p=$(dirname "$p")
            done
            for m in $missing_dirs; do
                mkdir -m 0755 "$m"
                [ "$m" = "$R/var/lib/wiregate" ] || printf '%s\n' "$m" >>"$CREATED_TMP"
            done
        done
    }

    # put_file PATH MODE SOURCE: install SOURCE's content as PATH (atomically, with MODE)
    # when it differs; return 0 when PATH changes (or would, in --dry-run), 1 otherwise.
    put_file() {
        if [ -f "$1" ] && cmp -s "$3" "$1"; then
            return 1
        fi
        # (set -e does not apply inside a function called from a condition: check each write)
        if step "write $1"; then
            if ! { mkdirs "$(dirname "$1")" && cp "$3" "$1.new" && chmod "$2" "$1.new" &&
                mv -f "$1.new" "$1"; }; then
                die "cannot write $1" "" 1
            fi
        fi
        return 0
    }

    # copy_secret file:PATH|env:VAR DEST: the secret into DEST (0600); the temporary copy
    # lives in the 0700 work directory
    copy_secret() {
        case $1 in
            file:*) cat -- "${1#file:}" >"$WORK/secret" ;;
            env:*) eval "printf '%s\\n' \"\${${1#env:}}\"" >"$WORK/secret" ;;
        esac
        put_file "$2" 0600 "$WORK/secret" || true
        rm -f "$WORK/secret"
    }

    agent_toml() {
        cat <<EOF
# Written by wiregate's bootstrap.sh; re-running it rewrites this file.
[agent]
server = "$SERVER"
interface = "${IFACE:-wg0}"
backend = "$BACKEND"
EOF
        [ -z "$HOSTNAME_OPT" ] || printf 'hostname = "%s"\n' "$HOSTNAME_OPT"
        [ -z "$AUTH_KEY" ] || printf 'auth_key = "file:%s"\n' "$ETC/auth-key"
        # the agent enrolls with the workload token when both are given
        [ -z "$WORKLOAD_TOKEN" ] || printf 'workload_token = "file:%s"\n' "$ETC/workload-token"
        [ -z "$CA_FILE" ] || printf 'ca_file = "%s"\n' "$ETC/ca.pem"
    }

    unit_text() {
        cat <<EOF
[Unit]
Description=wiregate agent (WireGuard mesh member, installed by bootstrap.sh)
Wants=network-online.target time-sync.target
After=network-online.target time-sync.target

[Service]
Type=exec
ExecStart=$R/usr/local/bin/wiregate agent --config $ETC/agent.toml --state-dir $R/var/lib/wiregate/agent --run-dir $R/run/wiregate
Restart=on-failure
RestartSec=2s
RestartPreventExitStatus=3
StateDirectory=wiregate/agent
StateDirectoryMode=0700
RuntimeDirectory=wiregate wireguard
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
KillMode=process
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=-/etc/resolv.conf
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=no
ProtectKernelModules=no
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=no
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
UMask=0077
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
EOF
    }

    # ------------------------------------------------------------------ the agent

    # machine: this host's wheel platform (uname -m), as the gateway names its requirements
    machine() {
        case $(uname -m) in
            x86_64 | amd64) echo x86_64 ;;
            aarch64 | arm64) echo aarch64 ;;
            *) die "the gateway has no wheels for this machine ($(uname -m))" \
                "install with --package SPEC (pip's own index) or --find-links DIR" ;;
        esac
    }

    # fetch_requirements: the gateway's pinned, hashed list for this machine, into
    # $WORK/requirements.txt (read-only, also in --dry-run)
    fetch_requirements() {
        REQUIREMENTS_URL="$SERVER/wheels/requirements-$(machine).txt"
        # the system's CAs, plus --ca-file's
        if ! "$PY" -c 'import sys, ssl, urllib.request as u; c = ssl.create_default_context(); sys.argv[3] and c.load_verify_locations(sys.argv[3]); open(sys.argv[2], "wb").write(u.urlopen(sys.argv[1], timeout=30, context=c).read())' \
            "$REQUIREMENTS_URL" "$WORK/requirements.txt" "$CA_FILE" 2>"$WORK/fetch.err"; then
            die "cannot fetch $REQUIREMENTS_URL: $(tail -n 1 "$WORK/fetch.err")" \
                "the gateway serves its wheelhouse when wheelhouse_dir is set (wiregate wheelhouse build); or pass --package SPEC or --find-links DIR" 1
        fi
        grep -q '^wiregate==' "$WORK/requirements.txt" ||
            die "$REQUIREMENTS_URL does not pin wiregate" "rebuild the gateway's wheelhouse: wiregate wheelhouse build" 1
        say "agent: $(sed -n 's/^wiregate==\([^ ]*\).*/wiregate \1/p' "$WORK/requirements.txt" | head -n 1) from $SERVER/simple/ (hashes required)"
    }

    # pip_from_gateway: pip with the gateway as its only index: no configuration file,
    # no PIP_* variable of this environment (another index, find-links) applies
    pip_from_gateway() (
        for var in $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p'); do
            unset "$var"
        done
        PIP_CONFIG_FILE=/dev/null
        export PIP_CONFIG_FILE
        [ -z "$CA_FILE" ] || { PIP_CERT=$CA_FILE && export PIP_CERT; } # trusted for the gateway
        set --
        case $SERVER in # plain http (warned about above): the hashes still bind every wheel
        http://*) host=${SERVER#http://} && set -- --trusted-host "${host%%/*}" ;;
        esac
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile "$@" \
            --index-url "$SERVER/simple/" --only-binary :all: --require-hashes \
            -r "$WORK/requirements.txt"
    )

    package_id() {
        if [ "$FROM_GATEWAY" = yes ]; then
            # the pins and hashes say what is installed, not which URL served them
            printf 'gateway %s\n' "$(cksum <"$WORK/requirements.txt")"
        elif [ -f "$PACKAGE" ]; then
            printf '%s %s\n' "$PACKAGE" "$(cksum <"$PACKAGE")"
        else
            printf '%s %s\n' "$PACKAGE" "$FIND_LINKS"
        fi
    }

    install_agent() {
        [ "$FROM_GATEWAY" = no ] || fetch_requirements
        if [ ! -x "$VENV/bin/python" ]; then
            if step "create the virtualenv $VENV"; then
                mkdirs "$(dirname "$VENV")"
                "$PY" -m venv "$VENV" || die "$PY -m venv $VENV failed" "" 1
            fi
        fi
        want=$(package_id)
        if [ -f "$VENV/.bootstrap-package" ] && [ "$(cat "$VENV/.bootstrap-package")" = "$want" ] &&
            [ -x "$VENV/bin/wiregate" ]; then
            say "agent: $PACKAGE already installed in $VENV"
        elif step "install $PACKAGE into $VENV"; then
            # Bytecode is compiled after the agent has started (see install), not here.
            if [ "$FROM_GATEWAY" = yes ]; then
                pip_from_gateway || die "could not install $PACKAGE from $SERVER into $VENV" \
                    "pip's message is above; a hash mismatch means a wheel on the gateway changed after its wheelhouse was built; no matching distribution: the wheelhouse has no wheels for this Python ($("$PY" -V 2>&1))" 1
            elif [ -n "$FIND_LINKS" ]; then
                set -- --no-index --find-links "$FIND_LINKS"
            else
                set --
            fi
            if [ "$FROM_GATEWAY" = no ]; then
                "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile "$@" \
                    "$PACKAGE" || die "could not install $PACKAGE into $VENV" \
                    "pip's message is above; with --find-links, DIR must hold a wheel of every dependency" 1
            fi
            printf '%s\n' "$want" >"$VENV/.bootstrap-package"
            COMPILE=yes
        fi
        link="$R/usr/local/bin/wiregate"
        if [ "$(readlink "$link" 2>/dev/null || true)" != "$VENV/bin/wiregate" ]; then
            if step "link $link -> $VENV/bin/wiregate"; then
                mkdirs "$(dirname "$link")"
                ln -sfn "$VENV/bin/wiregate" "$link"
            fi
        fi
    }

    wait_time_sync() {
        limit=${WIREGATE_TIMESYNC_TIMEOUT:-60}
        if have timedatectl && timedatectl show -p NTPSynchronized --value >/dev/null 2>&1; then
            waited=0
            while [ "$(timedatectl show -p NTPSynchronized --value 2>/dev/null)" != yes ]; do
                if [ "$waited" -ge "$limit" ]; then
                    warn "the clock is not synchronised after ${limit}s; starting anyway (tokens and handshakes need a correct clock)"
                    return 0
                fi
                [ "$waited" -gt 0 ] || say "waiting up to ${limit}s for time synchronisation"
                sleep 1
                waited=$((waited + 1))
            done
            say "clock synchronised (timedatectl)"
        elif have chronyc; then
            if chronyc waitsync "$(((limit + 1) / 2 + 1))" 0 0 2 >/dev/null 2>&1; then
                say "clock synchronised (chronyc)"
            else
                warn "chrony did not report synchronisation within ${limit}s; starting anyway"
            fi
        else
            warn "cannot tell whether the clock is synchronised (neither timedatectl nor chronyc answers); starting anyway"
        fi
    }

    service_manager() {
        if [ -n "${WIREGATE_SYSTEMCTL+set}" ]; then
            SYSTEMCTL=$WIREGATE_SYSTEMCTL # set but empty: act as without a service manager
        elif [ -d /run/systemd/system ]; then
            SYSTEMCTL=systemctl
        else
            SYSTEMCTL=''
        fi
    }

    start_agent() {
        if [ -z "$SYSTEMCTL" ]; then
            warn "systemd is not running: start the agent yourself: $R/usr/local/bin/wiregate agent --config $ETC/agent.toml"
            return 0
        fi
        [ "$UNIT_CHANGED" = no ] || { step "reload systemd units" && $SYSTEMCTL daemon-reload; }
        if ! $SYSTEMCTL is-enabled --quiet "$UNIT_NAME" 2>/dev/null; then
            step "enable $UNIT_NAME" && $SYSTEMCTL enable --quiet "$UNIT_NAME"
        fi
        if ! $SYSTEMCTL is-active --quiet "$UNIT_NAME" 2>/dev/null; then
            [ "$DRY_RUN" = yes ] && { printf 'would: wait for time synchronisation, then start %s\n' "$UNIT_NAME"; return 0; }
            wait_time_sync
            step "start $UNIT_NAME" && $SYSTEMCTL start "$UNIT_NAME"
        elif [ "$RESTART" = yes ]; then
            step "restart $UNIT_NAME (its configuration changed)" && $SYSTEMCTL restart "$UNIT_NAME"
        else
            say "$UNIT_NAME is running and up to date"
        fi
    }

    # After a first start: wait until the agent has enrolled (its device.json exists).
    # A refused enrollment (expired, used or revoked key; wrong server) makes the agent
    # exit, so the unit is seen inactive; then a first install is rolled back whole.
    wait_enrolled() {
        enrolled="$R/var/lib/wiregate/agent/device.json"
        if [ -z "$SYSTEMCTL" ] || [ "$DRY_RUN" = yes ] || [ -f "$enrolled" ]; then
            return 0
        fi
        limit=${WIREGATE_ENROLL_TIMEOUT:-90}
        say "waiting up to ${limit}s for the agent to enroll"
        waited=0 down=0
        while [ ! -f "$enrolled" ]; do
            if $SYSTEMCTL is-active --quiet "$UNIT_NAME" 2>/dev/null; then down=0; else down=$((down + 1)); fi
            if [ "$down" -ge 2 ] || [ "$waited" -ge "$limit" ]; then
                enrollment_failed "$([ "$down" -ge 2 ] && echo 'the agent exited' || echo "no enrollment after ${limit}s")"
            fi
            sleep 1
            waited=$((waited + 1))
        done
        say "the agent has enrolled"
        # and, briefly, until it has applied its first map (so that the work after this,
        # compiling bytecode, does not slow the first handshake down)
        waited=0
        while [ ! -f "$R/var/lib/wiregate/agent/netmap.json" ] && [ "$waited" -lt 10 ]; do
            sleep 1
            waited=$((waited + 1))
        done
    }

    enrollment_failed() {
        hint="check the enrollment key (expired, used up or revoked?) and --server; journalctl -u $UNIT_NAME shows the agent's error"
        if [ "$FIRST_INSTALL" = yes ]; then
            die "the agent could not enroll ($1); nothing is left installed" "$hint" 1
        fi
        die "the agent could not enroll ($1); the previous installation was kept" "$hint" 1
    }

    install() {
        [ "$DRY_RUN" = yes ] || [ "$(id -u)" = 0 ] || die "run as root (sudo sh bootstrap.sh ...)"
        FIRST_INSTALL=no
        [ -e "$ETC/agent.toml" ] || [ -e "$VENV" ] || FIRST_INSTALL=yes
        # A first install that fails (or is interrupted) before the agent has enrolled
        # is removed again by on_exit: nothing half-configured stays behind.
        [ "$FIRST_INSTALL" = no ] || [ "$DRY_RUN" = yes ] || ROLLBACK=yes
        detect_distro
        install_packages
        CHANGED=no
        COMPILE=no
        install_agent
        RESTART=$CHANGED
        [ "$DRY_RUN" = yes ] || [ -d "$ETC" ] || { mkdirs "$ETC" && chmod 0700 "$ETC"; }
        agent_toml >"$WORK/agent.toml"
        put_file "$ETC/agent.toml" 0600 "$WORK/agent.toml" || true
        [ -z "$AUTH_KEY" ] || copy_secret "$AUTH_KEY" "$ETC/auth-key"
        [ -z "$WORKLOAD_TOKEN" ] || copy_secret "$WORKLOAD_TOKEN" "$ETC/workload-token"
        [ -z "$CA_FILE" ] || put_file "$ETC/ca.pem" 0644 "$CA_FILE" || true
        [ "$CHANGED" = no ] || RESTART=yes
        UNIT_CHANGED=no
        unit_text >"$WORK/unit"
        if put_file "$UNIT" 0644 "$WORK/unit"; then
            UNIT_CHANGED=yes
            RESTART=yes
        fi
        # Directories the agent creates itself (systemd does it under a real install):
        # made here so that --uninstall can tell they are ours.
        [ "$DRY_RUN" = yes ] || mkdirs "$R/var/lib/wiregate" "$R/run"
        remember_created
        start_agent
        wait_enrolled
        ROLLBACK=no
        if [ "$COMPILE" = yes ]; then
            # After the agent has enrolled: its start and first handshake do not wait for
            # it. The unit's ProtectSystem=strict keeps the agent from writing bytecode.
            say "compiling the agent's bytecode"
            "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >/dev/null 2>&1 ||
                warn "compiling bytecode failed; the agent still runs, only starts slower"
        fi
        if [ "$DRY_RUN" = yes ]; then
            say "dry run: nothing was changed"
        else
            say "done: $R/usr/local/bin/wiregate status shows the tunnel"
        fi
    }

    remember_created() {
        [ -s "$CREATED_TMP" ] || return 0
        [ "$DRY_RUN" = no ] || return 0
        mkdirs "$R/var/lib/wiregate"
        cat "$CREATED_TMP" >>"$R/var/lib/wiregate/bootstrap-created"
        : >"$CREATED_TMP"
    }

    # ------------------------------------------------------------------ uninstall

    configured_interface() {
        if [ -n "$IFACE" ]; then
            printf '%s\n' "$IFACE"
        elif [ -f "$ETC/agent.toml" ]; then
            sed -n 's/^interface = "\([A-Za-z0-9._-]*\)"$/\1/p' "$ETC/agent.toml" | head -n 1
        fi
    }

    remove_path() {
        [ -e "$1" ] || [ -L "$1" ] || return 0
        step "remove $1" && rm -rf -- "$1"
        return 0
    }

    uninstall() {
        [ "$DRY_RUN" = yes ] || [ "$(id -u)" = 0 ] || die "run as root (sudo sh bootstrap.sh --uninstall)"
        CHANGED=no
        iface=$(configured_interface)
        if [ -n "$SYSTEMCTL" ] && [ -f "$UNIT" ]; then
            step "stop and disable $UNIT_NAME" && { $SYSTEMCTL disable --now --quiet "$UNIT_NAME" || true; }
        fi
        if [ -n "$iface" ] && ip link show dev "$iface" >/dev/null 2>&1; then
            step "delete the interface $iface" && ip link del dev "$iface"
        fi
        if [ -n "$iface" ] && [ -S "/var/run/wireguard/$iface.sock" ]; then
            step "remove /var/run/wireguard/$iface.sock" && {
                sleep 1
                rm -f "/var/run/wireguard/$iface.sock"
            }
        fi
        if [ -f "$UNIT" ]; then
            remove_path "$UNIT"
            [ -z "$SYSTEMCTL" ] || { step "reload systemd units" && $SYSTEMCTL daemon-reload; }
        fi
        link="$R/usr/local/bin/wiregate"
        [ "$(readlink "$link" 2>/dev/null || true)" != "$VENV/bin/wiregate" ] || remove_path "$link"
        remove_path "$VENV"
        remove_path "$ETC"
        remove_path "$R/run/wiregate"
        state="$R/var/lib/wiregate"
        packages=''
        [ ! -f "$state/bootstrap-packages" ] || packages=$(sort -u "$state/bootstrap-packages" | tr '\n' ' ')
        [ ! -f "$state/bootstrap-created" ] || cat "$state/bootstrap-created" >>"$CREATED_TMP"
        created=$(sort -r -u "$CREATED_TMP")
        remove_path "$state"
        for d in $created; do # directories bootstrap made, deepest first, when now empty
            [ -d "$d" ] || continue
            [ -n "$(ls -A "$d")" ] || { step "remove the empty directory $d" && rmdir "$d"; }
        done
        [ -z "$packages" ] || say "packages installed by bootstrap were kept: $packages(remove them with your package manager if nothing else needs them)"
        if [ "$DRY_RUN" = yes ]; then
            say "dry run: nothing was changed"
        elif [ "$CHANGED" = yes ]; then
            say "wiregate removed"
        else
            say "nothing to remove"
        fi
    }

    # ------------------------------------------------------------------ main

    parse_args "$@"
    ROOT=${WIREGATE_ROOT:-/}
    validate_args
    R=${ROOT%/}
    ETC="$R/etc/wiregate"
    VENV="$R/opt/wiregate"
    UNIT="$R/etc/systemd/system/$UNIT_NAME"
    PY=${WIREGATE_PYTHON:-python3}
    BACKEND=auto
    on_exit() {
        status=$?
        trap - EXIT
        if [ "$status" -ne 0 ] && [ "$ROLLBACK" = yes ]; then
            ROLLBACK=no
            set +e
            warn "the first install failed: removing what this run installed"
            uninstall
        fi
        rm -rf "$WORK"
        exit "$status"
    }
    ROLLBACK=no
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/wiregate-bootstrap.XXXXXX")
    trap on_exit EXIT
    trap 'exit 130' INT TERM
    CREATED_TMP="$WORK/created"
    : >"$CREATED_TMP"
    service_manager
    [ "$DRY_RUN" = no ] || say "dry run: printing the plan"
    if [ "$UNINSTALL" = yes ]; then
        uninstall
    else
        install
    fi
}

main "$@"
