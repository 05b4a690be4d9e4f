#!/bin/sh
# udhcpc's event script in the si boot package: configures the interface and writes what the
# lease said to /run/si/net (shell variables, read by /init and by si-install).
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        bits=24
        [ -n "$subnet" ] && bits=$(ipcalc -p "$ip" "$subnet" | cut -d= -f2)
        ip addr flush dev "$interface"
        ip addr add "$ip/$bits" dev "$interface"
        for r in $router; do ip route add default via "$r" dev "$interface" && break; done
        : > /etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        mac=$(cat "/sys/class/net/$interface/address")
        {
            echo "SI_IFACE='$interface'"
            echo "SI_MAC='$mac'"
            echo "SI_IP='$ip'"
            echo "SI_MASK='$bits'"
            echo "SI_ROUTER='${router%% *}'"
            echo "SI_DNS='$dns'"
            echo "SI_DOMAIN='$domain'"
            echo "SI_HOSTNAME='$hostname'"
            echo "SI_DHCP_SERVER='$serverid'"
            echo "SI_NEXT_SERVER='$siaddr'"
        } > /run/si/net.tmp
        mv /run/si/net.tmp /run/si/net
        ;;
esac
exit 0
