#!/bin/sh
# /init of the si boot package (written by si-mkbootpackage; docs/installer.md, "Boot package").
# Mounts the kernel filesystems, loads the package's modules, brings up the network by DHCP and
# runs /bin/si-install. A non-zero exit of the installer, or si.break=init|modules|net, gives a
# shell on the console. The installer reads /proc/cmdline itself; what init learned about the
# network is in /run/si/net (shell variables).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=linux

mkdir -p /proc /sys /dev /run /tmp /root
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
if ! mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev; then
    # A kernel without devtmpfs: busybox's mdev makes the nodes (and hotplugged ones).
    mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
    echo /sbin/mdev > /proc/sys/kernel/hotplug
    mdev -s
fi
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620 devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p /run/si /run/lock /var/log
ln -sf /proc/self/mounts /etc/mtab

log() { echo "si-boot: $*"; }

shell() {
    log "$1"
    log "rescue shell on the console (exit it to $2)"
    setsid cttyhack sh -l
}

bootif= iface= brk= timeout=60 debug=
for w in $(cat /proc/cmdline); do
    case "$w" in
        BOOTIF=*) bootif=${w#BOOTIF=} ;;
        si.iface=*) iface=${w#si.iface=} ;;
        si.break=*) brk=,${w#si.break=}, ;;
        si.dhcp-timeout=*) timeout=${w#si.dhcp-timeout=} ;;
        si.debug) debug=1 ;;
    esac
done
[ -n "$debug" ] && set -x
case "$timeout" in ''|*[!0-9]*) timeout=60 ;; esac
log "init started, kernel $(uname -r)"
case "$brk" in *,init,*) shell "si.break=init: stopped before loading modules" "go on" ;; esac

# Modules, dependencies first (the order file is written at build time from modules.dep).
rel=$(uname -r)
n=0 failed=
if [ -r "/lib/modules/$rel/si-load-order" ]; then
    while read -r m; do
        [ -n "$m" ] || continue
        if out=$(insmod "/lib/modules/$rel/$m" 2>&1); then
            n=$((n + 1))
        else
            case "$out" in *"File exists"*|*"exists"*) ;; *) failed="$failed ${m##*/}" ;; esac
        fi
    done < "/lib/modules/$rel/si-load-order"
else
    log "no modules for kernel $rel in this package (built for another kernel?)"
fi
log "loaded $n modules${failed:+; failed:$failed}"
# UEFI variables (efibootmgr): efivarfs is a module in Debian's kernel, so after the modules.
if [ -d /sys/firmware/efi/efivars ] && ! grep -q " /sys/firmware/efi/efivars " /proc/mounts; then
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars || log "could not mount efivarfs"
fi
case "$brk" in *,modules,*) shell "si.break=modules: stopped before the network" "go on" ;; esac

# Network. BOOTIF=01-aa-bb-cc-dd-ee-ff (pxelinux IPAPPEND 2, si's iPXE scripts) names the NIC
# that booted; si.iface= names one outright; otherwise the first interface that gets a lease.
want_mac=
if [ -n "$bootif" ]; then
    want_mac=$(echo "${bootif#01-}" | tr 'A-F-' 'a-f:')
fi
ip link set lo up
pick_ifaces() {
    for d in /sys/class/net/*; do
        i=${d##*/}
        [ "$i" = lo ] && continue
        [ -e "$d/device" ] || continue
        if [ -n "$iface" ]; then
            [ "$i" = "$iface" ] && echo "$i"
        elif [ -n "$want_mac" ]; then
            [ "$(cat "$d/address")" = "$want_mac" ] && echo "$i"
        else
            echo "$i"
        fi
    done
}
up=
start=$(cut -d. -f1 /proc/uptime)
while [ -z "$up" ]; do
    for i in $(pick_ifaces); do
        ip link set "$i" up
        if udhcpc -i "$i" -n -q -t 4 -T 2 -O hostname -O domain -x "hostname:si-installer" \
            -s /usr/share/udhcpc/default.script >/run/si/udhcpc.log 2>&1; then
            up=$i
            break
        fi
    done
    now=$(cut -d. -f1 /proc/uptime)
    if [ -z "$up" ] && [ $((now - start)) -ge "$timeout" ]; then
        break
    fi
    [ -z "$up" ] && sleep 1
done
if [ -z "$up" ]; then
    ifs=$(ls /sys/class/net | tr '\n' ' ')
    shell "no DHCP lease after ${timeout}s (interfaces: $ifs${want_mac:+; BOOTIF $want_mac}${iface:+; si.iface=$iface})" "try si-install anyway"
else
    . /run/si/net
    log "network up on $up ($SI_IP/$SI_MASK via ${SI_ROUTER:-none}, mac $SI_MAC)"
fi
case "$brk" in *,net,*) shell "si.break=net: stopped before the installer" "run si-install" ;; esac

# The installer. It does its post-action itself (reboot, poweroff, kexec) or exits 0 after
# writing the action init should take to /run/si/post-action (reboot when absent).
log "starting si-install"
/bin/si-install
rc=$?
if [ "$rc" -ne 0 ]; then
    while :; do
        shell "si-install failed (exit $rc); the install log is in /run/si" "run it again"
        /bin/si-install && { rc=0; break; }
        rc=$?
    done
fi
action=reboot
[ -r /run/si/post-action ] && action=$(cat /run/si/post-action)
sync
case "$action" in
    poweroff) log "si-install done: powering off"; poweroff -f ;;
    shell) while :; do shell "si-install done: post-action shell" "get another shell"; done ;;
    *) log "si-install done: rebooting"; reboot -f ;;
esac
# Never return: PID 1 exiting panics the kernel.
while :; do sleep 3600; done
