/* ifovpn.c: FreeBSD LP64 ioctl structures and calls for if_ovpn(4).
 *
 * The structures are defined here under our own names with FreeBSD's
 * layout, so the binding compiles and its layout is testable on any host.
 * On FreeBSD the layout is asserted against the system headers.  This file
 * is concatenated with the other cdefs .c files into one translation unit,
 * so every name is prefixed bsd_ovpn_ / BSD_OVPN_.
 */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/types.h>
#include <sys/ioctl.h>
#ifdef __FreeBSD__
#include <sys/param.h>
#include <sys/linker.h>
#include <sys/socket.h>
#include <sys/sockio.h>
#include <net/if.h>
#endif

#define BSD_OVPN_IFNAMSIZ 16

struct bsd_ovpn_ifdrv {
    char          ifd_name[16];
    unsigned long ifd_cmd;
    size_t        ifd_len;
    void         *ifd_data;
};

struct bsd_ovpn_sockaddr {
    unsigned char sa_len;
    unsigned char sa_family;
    char          sa_data[14];
};

struct bsd_ovpn_ifreq_buffer {
    size_t length;
    void  *buffer;
};

struct bsd_ovpn_ifreq {
    char ifr_name[16];
    union {
        struct bsd_ovpn_sockaddr     ifru_addr;
        struct bsd_ovpn_ifreq_buffer ifru_buffer;
        short                        ifru_flags[2];
        short                        ifru_index;
        int                          ifru_metric;
        int                          ifru_mtu;
        char                        *ifru_data;
        int                          ifru_cap[2];
        unsigned int                 ifru_fib;
    } ifr_ifru;
};

struct bsd_ovpn_if_clonereq {
    int   ifcr_total;
    int   ifcr_count;
    char *ifcr_buffer;
};

/* FreeBSD <sys/ioccom.h>: dir | (len & 0x1fff) << 16 | group << 8 | num. */
#define BSD_OVPN_IOC_OUT 0x40000000UL
#define BSD_OVPN_IOC_IN 0x80000000UL
#define BSD_OVPN_IOC_INOUT (BSD_OVPN_IOC_IN | BSD_OVPN_IOC_OUT)
#define BSD_OVPN_IOC(dir, group, num, len) \
    ((unsigned long)((dir) | ((((unsigned long)(len)) & 0x1fffUL) << 16) | \
                     ((unsigned long)(group) << 8) | (unsigned long)(num)))

#define BSD_OVPN_SIOCSDRVSPEC \
    BSD_OVPN_IOC(BSD_OVPN_IOC_IN, 'i', 123, sizeof(struct bsd_ovpn_ifdrv))
#define BSD_OVPN_SIOCGDRVSPEC \
    BSD_OVPN_IOC(BSD_OVPN_IOC_INOUT, 'i', 123, sizeof(struct bsd_ovpn_ifdrv))
#define BSD_OVPN_SIOCIFCREATE2 \
    BSD_OVPN_IOC(BSD_OVPN_IOC_INOUT, 'i', 124, sizeof(struct bsd_ovpn_ifreq))
#define BSD_OVPN_SIOCIFDESTROY \
    BSD_OVPN_IOC(BSD_OVPN_IOC_IN, 'i', 121, sizeof(struct bsd_ovpn_ifreq))
#define BSD_OVPN_SIOCSIFNAME \
    BSD_OVPN_IOC(BSD_OVPN_IOC_IN, 'i', 40, sizeof(struct bsd_ovpn_ifreq))
#define BSD_OVPN_SIOCIFGCLONERS \
    BSD_OVPN_IOC(BSD_OVPN_IOC_INOUT, 'i', 120, sizeof(struct bsd_ovpn_if_clonereq))

#if defined(__FreeBSD__) && defined(__LP64__)
_Static_assert(sizeof(struct bsd_ovpn_ifdrv) == sizeof(struct ifdrv), "ifdrv size");
_Static_assert(offsetof(struct bsd_ovpn_ifdrv, ifd_cmd) == offsetof(struct ifdrv, ifd_cmd), "ifd_cmd");
_Static_assert(offsetof(struct bsd_ovpn_ifdrv, ifd_len) == offsetof(struct ifdrv, ifd_len), "ifd_len");
_Static_assert(offsetof(struct bsd_ovpn_ifdrv, ifd_data) == offsetof(struct ifdrv, ifd_data), "ifd_data");
_Static_assert(sizeof(struct bsd_ovpn_ifreq) == sizeof(struct ifreq), "ifreq size");
_Static_assert(offsetof(struct bsd_ovpn_ifreq, ifr_ifru) == offsetof(struct ifreq, ifr_ifru), "ifr_ifru");
_Static_assert(sizeof(struct bsd_ovpn_if_clonereq) == sizeof(struct if_clonereq), "if_clonereq size");
_Static_assert(offsetof(struct bsd_ovpn_if_clonereq, ifcr_buffer) == offsetof(struct if_clonereq, ifcr_buffer), "ifcr_buffer");
_Static_assert(BSD_OVPN_SIOCSDRVSPEC == SIOCSDRVSPEC, "SIOCSDRVSPEC");
_Static_assert(BSD_OVPN_SIOCGDRVSPEC == SIOCGDRVSPEC, "SIOCGDRVSPEC");
_Static_assert(BSD_OVPN_SIOCIFCREATE2 == SIOCIFCREATE2, "SIOCIFCREATE2");
_Static_assert(BSD_OVPN_SIOCIFDESTROY == SIOCIFDESTROY, "SIOCIFDESTROY");
_Static_assert(BSD_OVPN_SIOCSIFNAME == SIOCSIFNAME, "SIOCSIFNAME");
_Static_assert(BSD_OVPN_SIOCIFGCLONERS == SIOCIFGCLONERS, "SIOCIFGCLONERS");
#endif

int bsd_ovpn_is_freebsd(void)
{
#ifdef __FreeBSD__
    return 1;
#else
    return 0;
#endif
}

int bsd_ovpn_ioctl(int fd, unsigned long request, void *arg)
{
#ifdef __FreeBSD__
    return ioctl(fd, request, arg);
#else
    (void)fd; (void)request; (void)arg;
    errno = ENOSYS;
    return -1;
#endif
}

int bsd_ovpn_kldload(const char *file)
{
#ifdef __FreeBSD__
    return kldload(file);
#else
    (void)file;
    errno = ENOSYS;
    return -1;
#endif
}
